from twisted.application.service import ServiceMaker

swarmcache = ServiceMaker(
    "swarmcache", "swarm.tap", "A swarm of WebSocket cache nodes", "swarmcache"
)
