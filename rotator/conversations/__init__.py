"""Conversation affinity's pure core: which conversation a request belongs to (`ids`)
and which key each live conversation is pinned to (`pins`).

Nothing here reads the clock, the pool or a store: times come in as int milliseconds,
keys as plain strings, and what the pool knows (usable keys, the strategy's choice,
keys near their reserve) as plain arguments. The proxy's hooks and the team store wire
it in.
"""
