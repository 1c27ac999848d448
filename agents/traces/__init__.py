"""Traces of the bus: recording (recorder), reading what experts did (recorded), re-publishing
and replay experts (republish, replay), and synthetic traces for tests and benchmarks."""
