"""Where keys live and how requests reach them: placement, routing, handoffs.

Knows the mesh only through the small interface the router is given.
"""
