"""inspectd engine: the one preprocessing definition, the model package, and the inference backends.

Knows nothing about sockets, watched folders or training loops. Imports neither torch nor tensorrt at
module level.
"""
