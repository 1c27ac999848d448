"""The agents: thin NATS I/O around the runtime's pure logic."""
