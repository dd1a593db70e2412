"""The business: synthetic studies made, stored and indexed; later orders, worklist and routing (layer 4)."""
