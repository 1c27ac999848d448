"""The moe2 runtime: subjects, wire messages, fusion maths, sampling, traces, NATS plumbing."""
