"""The live key pool of a running proxy (`key_pool.KeyPool`): choosing a key, holding it
(`lease`), what an answer or a reading does to a key (`key_updates`), what the pool hears
from outside (`from_outside`) and the requests waiting for a key (`waitline`). Memory
only: no store, no I/O."""
