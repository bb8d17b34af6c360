"""Tools around the daemon, clients of its wire contract: the one-command demo and its live view, the
simulated camera, the verdict watcher and the synthetic screw generator. The daemon never imports them."""
