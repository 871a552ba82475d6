"""Embed a swarmcache node in an existing Twisted application.

Run it: ``python docs/examples/embed.py``. It starts a node inside the application's
MultiService (on a free loopback port), uses it in-process, then over the network with
the project's client, exactly as another program on the host would, and shuts down.
"""

from twisted.application.service import MultiService
from twisted.internet import task

from swarm.client import SwarmClient
from swarm.service import SwarmNode


async def main(reactor):
    application = MultiService()          # your application's top service
    node = SwarmNode("tcp:0:interface=127.0.0.1", reactor=reactor, node_id="embedded")
    node.setServiceParent(application)
    application.startService()
    await node.when_listening()

    # In-process: Deferred-returning calls, validated like network requests.
    await node.set("greeting", "hello", ttl=60)
    print("in-process get:", await node.get("greeting"))
    print("counter:", await node.incr("visits"), await node.incr("visits"))

    # Over the network: the same methods on the client.
    client = await SwarmClient.connect(node.url, reactor=reactor)
    print("client get:", await client.get("greeting"))
    print("keys on the node:", (await client.stats())["keys"])
    await client.close()

    await application.stopService()


if __name__ == "__main__":
    task.react(lambda reactor: task.ensureDeferred(main(reactor)))
