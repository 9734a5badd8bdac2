"""Conversation affinity against a modelled prompt cache (issue 25): what it buys and costs.

In process, in virtual time: N agents each run a conversation of M turns whose context
grows every turn, in parallel, through the proxy's own deciding parts (rotator.pool's
KeyPool and Affinity, rotator.core.policy reading the answers); a modelled Kimi stands in
for the server:
- a prompt cache per key and conversation: a turn reads the previous turn's whole
  context from cache when the same key served that turn within CACHE_TTL_MS;
- time to first token grows with the tokens not read from cache (PREFILL_TOKENS_PER_S),
  then a generation time (GENERATION_MS, give or take half, seeded); the agent thinks
  THINK_MS (give or take half) before its next turn;
- a parallel limit per key: a request beyond it is refused (429, Kimi's "concurrent
  request limit" wording), which the pool reads as it reads the real one, and the turn
  is retried on another key or waits, as the proxy does. The pool knows the limit (as
  after its /usages poll at start, which reports it) unless --unknown-limit.
For each strategy, with affinity on and off: the share of input read from cache (and
that share over the ideal, every conversation on one key), modelled time to first
token (p50 / p90, waiting included), refusals, and conversations per key (by the key
that served most of each conversation's turns).

Targets (issue 25), per strategy with affinity on: cache share >= 0.95 of the ideal; no
key has more conversations than its share (agents / keys, rounded up) plus one; refusals
no more than with affinity off.

    python bench/sessions.py [--quick] [--agents N] [--turns M] [--keys K] [--parallel P] [--seed S]
                             [--unknown-limit]
"""

from __future__ import annotations

import heapq
import itertools
import random
import sys
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402
from rotator.conversations.ids import Conversation  # noqa: E402
from rotator.conversations.pins import PinTable  # noqa: E402
from rotator.core import policy  # noqa: E402
from rotator.core.models import Account, AccountsFile  # noqa: E402
from rotator.core.quota import QuotaReading  # noqa: E402
from rotator.pool.affinity import Affinity, Turn  # noqa: E402
from rotator.pool.key_pool import KeyPool  # noqa: E402
from rotator.pool.lease import Lease  # noqa: E402

CACHE_TTL_MS = 5 * 60_000
PREFILL_TOKENS_PER_S = 20_000
FIRST_TOKEN_FLOOR_MS = 300
GENERATION_MS = 4_000
THINK_MS = 3_000
FIRST_CONTEXT = 12_000  # tokens: system prompt and tools
TOKENS_PER_TURN = 3_000  # the user's message, tool results and the answer, added each turn
CONCURRENCY_BODY = b'{"error":{"type":"rate_limit_reached_error","message":"concurrent request limit reached"}}'
STRATEGIES = ("health-based", "round-robin", "sticky")


class SimClock:
    """Virtual time for the pool (it reads now_ms; nothing here schedules through it)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000_000

    def now_ms(self) -> int:
        return self.now

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> object:
        raise AssertionError("the model runs no pool timers")


@dataclass(eq=False)
class Request:
    agent: int
    turn: int
    tokens: int
    started: int
    tried: set[str] = field(default_factory=set)
    pinned: Turn | None = None
    first: bool = True


class Model:
    def __init__(self, strategy: str, affinity: bool, agents: int, turns: int, keys: int, parallel: int,
                 seed: int, known_limit: bool = True) -> None:
        self.clock = SimClock()
        # Known: as after the proxy's /usages poll at start, which reports the parallel limit.
        reading = QuotaReading(taken_at=self.clock.now, parallel_limit=parallel) if known_limit else None
        state = AccountsFile(accounts=[Account(key=C.bench_key(i), name=f"K{i}", quota=reading)
                                       for i in range(keys)], rotation_strategy=strategy)
        self.pool = KeyPool(state, clock=self.clock)
        self.affinity = Affinity(self.pool, PinTable()) if affinity else None
        self.turns, self.parallel = turns, parallel
        self.random = random.Random(seed)
        self.events: list[tuple[int, int, Callable[[], None]]] = []
        self.order = itertools.count()
        self.busy: Counter[str] = Counter()  # Kimi's view: requests in flight per key
        self.cache: dict[tuple[str, int], tuple[int, int]] = {}  # (key, agent) -> (tokens, at_ms)
        self.waiting: deque[Request] = deque()
        self.wake_at: int | None = None
        self.input_tokens = self.cached_tokens = self.ideal_cached = self.refusals = 0
        self.first_token_ms: list[int] = []
        self.served: dict[int, Counter[str]] = {a: Counter() for a in range(agents)}
        for agent in range(agents):
            self.at(self.clock.now + self.random.randrange(0, 2_000), lambda a=agent: self.start(a, 0))

    def at(self, when: int, action: Callable[[], None]) -> None:
        heapq.heappush(self.events, (when, next(self.order), action))

    def run(self) -> None:
        while self.events:
            when, _, action = heapq.heappop(self.events)
            self.clock.now = max(self.clock.now, when)
            action()

    def start(self, agent: int, turn: int) -> None:
        tokens = FIRST_CONTEXT + turn * TOKENS_PER_TURN
        self.input_tokens += tokens
        if turn:
            self.ideal_cached += tokens - TOKENS_PER_TURN  # the previous turn's whole context
        self.send(Request(agent, turn, tokens, self.clock.now))

    def send(self, request: Request) -> None:
        now = self.clock.now
        lease: Lease | object
        if request.first and self.affinity is not None:
            conversation = Conversation(f"agent-{request.agent}", "x-claude-code-session-id", "claude-code")
            request.pinned, lease = self.affinity.begin(conversation, now)
        else:
            lease = self.pool.acquire_preferring_untried(now, request.tried)
        request.first = False
        if not isinstance(lease, Lease):
            self.wait(request)
            return
        if request.pinned is not None and self.affinity is not None:
            self.affinity.went_to(request.pinned, lease.key, now)
        self.kimi(request, lease)

    def wait(self, request: Request) -> None:
        self.waiting.append(request)
        why = self.pool.peek(self.clock.now)
        frees = getattr(why, "available_at_ms", None)
        if frees is not None and (self.wake_at is None or frees < self.wake_at):
            self.wake_at = frees
            self.at(frees, self.wake)

    def wake(self) -> None:
        self.wake_at = None
        for _ in range(len(self.waiting)):
            if not self.waiting:
                break
            request = self.waiting.popleft()
            before = len(self.waiting)
            self.send(request)
            if len(self.waiting) > before:  # it could not be served: the rest wait too
                break

    def kimi(self, request: Request, lease: Lease) -> None:
        now, key = self.clock.now, lease.key
        if self.busy[key] >= self.parallel:
            self.refusals += 1
            outcome = policy.classify(429, {"content-type": "application/json"}, CONCURRENCY_BODY, now)
            self.pool.release(lease, outcome, now)
            request.tried.add(key)
            self.send(request)  # on another key, or it waits
            return
        self.busy[key] += 1
        self.served[request.agent][key] += 1
        cached_tokens, at = self.cache.get((key, request.agent), (0, 0))
        cached = min(cached_tokens, request.tokens) if now - at <= CACHE_TTL_MS else 0
        self.cached_tokens += cached
        first_token = FIRST_TOKEN_FLOOR_MS + (request.tokens - cached) * 1000 // PREFILL_TOKENS_PER_S
        self.first_token_ms.append(now - request.started + first_token)
        generation = self.random.randint(GENERATION_MS // 2, GENERATION_MS * 3 // 2)
        self.at(now + first_token + generation, lambda: self.finish(request, lease, first_token))

    def finish(self, request: Request, lease: Lease, took_ms: int) -> None:
        now, key = self.clock.now, lease.key
        self.busy[key] -= 1
        self.cache[(key, request.agent)] = (request.tokens, now)
        self.pool.release(lease, policy.classify(200, {}, b"{}", now), now, took_ms)
        self.wake()
        if request.turn + 1 < self.turns:
            think = self.random.randint(THINK_MS // 2, THINK_MS * 3 // 2)
            self.at(now + think, lambda: self.start(request.agent, request.turn + 1))

    def conversations_per_key(self) -> list[int]:
        mostly = Counter(counts.most_common(1)[0][0] for counts in self.served.values() if counts)
        return [mostly.get(account.key, 0) for account in self.pool.accounts]


def main() -> int:
    ap = C.parser(__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=6)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--keys", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=2, help="Kimi's parallel limit per key")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--unknown-limit", action="store_true",
                    help="the pool has no /usages reading, so it does not know Kimi's parallel limit")
    args = ap.parse_args()
    if args.quick:
        args.turns = min(args.turns, 5)
    C.print_header("conversation affinity against a modelled prompt cache", [
        f"model: {args.agents} agents x {args.turns} turns over {args.keys} keys, parallel limit {args.parallel} "
        f"per key ({'unknown to the pool' if args.unknown_limit else 'known to the pool, as after /usages'}); context {FIRST_CONTEXT} tokens + {TOKENS_PER_TURN} per turn; prefill "
        f"{PREFILL_TOKENS_PER_S} tokens/s, generation {GENERATION_MS} ms and think {THINK_MS} ms (+-50 %, seed "
        f"{args.seed}), cache TTL "
        f"{CACHE_TTL_MS // 60_000} min",
    ])
    rows, results = [], {}
    for strategy in STRATEGIES:
        for on in (True, False):
            model = Model(strategy, on, args.agents, args.turns, args.keys, args.parallel, args.seed,
                          known_limit=not args.unknown_limit)
            with C.watchdog(120):
                model.run()
            share = model.cached_tokens / model.input_tokens
            ideal = model.ideal_cached / model.input_tokens
            waits = model.first_token_ms
            per_key = model.conversations_per_key()
            results[(strategy, on)] = (share / ideal, max(per_key), model.refusals)
            rows.append([strategy, "on" if on else "off", f"{share:.3f}", f"{share / ideal:.3f}",
                         f"{C.percentile(waits, 50) / 1000:.2f}", f"{C.percentile(waits, 90) / 1000:.2f}",
                         model.refusals, "/".join(map(str, per_key))])
    C.print_table(["strategy", "affinity", "cache share", "of ideal", "ttft p50 s", "ttft p90 s", "refusals",
                   "conversations per key"], rows)
    print()
    share_limit = -(-args.agents // args.keys) + 1
    for strategy in ("health-based", "round-robin"):
        of_ideal, most, refused = results[(strategy, True)]
        met = of_ideal >= 0.95 and most <= share_limit and refused <= results[(strategy, False)][2]
        print(f"target {strategy}: cache share {of_ideal:.3f} of ideal (>= 0.95), at most {most} conversations "
              f"on a key (<= {share_limit}), refusals {refused} (<= {results[(strategy, False)][2]} off): "
              f"{C.verdict(met)}")
    of_ideal, most, refused = results[("sticky", True)]
    print(f"sticky: new conversations go to the sticky key (as without affinity), moving when it refuses: "
          f"cache share {of_ideal:.3f} of ideal, "
          f"refusals {refused} (off: {results[('sticky', False)][2]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
