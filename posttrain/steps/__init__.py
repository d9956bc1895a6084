"""The two steps of the one trainer: PairStep (offline pairs) and GroupStep (online groups)."""
