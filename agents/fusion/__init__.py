"""The fusion role: the queue-group agent (agent), one session's I/O around the decode loop
(session), membership by heartbeat and live re-selection of S."""
