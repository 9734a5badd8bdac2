"""The pool kept in step with its store: the save loop (`save_loop.PoolSync`: the pool's
changes out, the store's state back; for the accounts file too) and, on a store a team
shares, its in-flight caps (`team_caps`) and the notices its processes tell each other
(`team_notices`)."""
