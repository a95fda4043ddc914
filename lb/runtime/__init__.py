"""The runtime API: HAProxy's stats socket commands, served by the master."""
