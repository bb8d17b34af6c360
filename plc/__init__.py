"""The PLC bridge (``inspectd plc-bridge``): verdicts where a PLC can read them, over OPC UA and Modbus TCP.

A separate process, a client of the daemon's verdict wire like any other subscriber: it never touches the
daemon's hot path, and the daemon never imports it. Layout:

- ``handshake``: the result handshake itself, no I/O — what the bridge knows of the daemon (alive, ready,
  boot, gaps: ``daemon.sequence.SequenceTracker``), the bounded buffer of unacknowledged verdicts per PLC
  protocol, and the fault causes that tell a PLC to divert everything;
- ``modbus_map`` and ``modbus``: the register map (pure functions) and the pymodbus server that serves it;
- ``opcua``: the asyncua server, its address space and the verdict events;
- ``metrics``, ``settings``, ``bridge`` (the wiring: one asyncio loop), ``command`` (the verb).

docs/plc.md documents the address space, the register map and the handshake.
"""
