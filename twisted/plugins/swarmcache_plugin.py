from twisted.application.service import ServiceMaker

swarmcache = ServiceMaker(
    "swarmcache", "swarm.node.tap", "A swarm of WebSocket cache nodes", "swarmcache"
)
