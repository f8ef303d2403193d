"""Scale-out on Ray (the ``ray`` extra): bulk sampling into a shard folder (``bulk``), the
server as a Ray Serve deployment (``ray_serve``) and what both share (``cluster``). The
shard folder's format (``shards``) needs no Ray."""
