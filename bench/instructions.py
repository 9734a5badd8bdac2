"""Instructions per request: what each arm costs mitmdump, counted by valgrind, not timed.

On these shared 2-core machines wall-clock throughput moves by ±30 % from minute to
minute, too much to see a few per cent. Here every proxy runs under
`valgrind --tool=callgrind`, which counts the instructions the process executes: the
same work gives the same count however busy the machine is. Per arm, after a warm-up
(every connection used once), the counters are zeroed, N requests go through, and the
counters are read (`callgrind_control -z` / `-d`); first over 1 keep-alive connection
(one request at a time), then over 16 at once (the proxy busy, as under full load).
For a proxy that is bound by its CPU, bare/arm instructions is the throughput the arm
keeps.

Arms (all reverse mode in front of one fake Kimi, flow_detail=0):
- bare: mitmdump alone;
- hooks: a script whose four request hooks do nothing: what calling a script costs;
- streamer: a script that only streams SSE answers (`response.stream`): the floor for
  agent traffic, since bare mitmdump buffers SSE;
- passthrough: the addon loaded, but kimi_hosts left at api.kimi.com, so its hooks
  return at once;
- addon: the addon on an accounts file of 3 keys, every request gets a pool key;
- before: the same, with the addon of another checkout (`--before DIR`, e.g. a worktree
  of main): what a change costs, counted in the same run;
- redis: the same on a Redis store (`--redis`): each request takes a team slot; the
  redis-server's own instructions (also under callgrind) are added, since it runs on
  the same machine.
- bare-sessions, sessions, sessions-off (`--arms bare-sessions,sessions,sessions-off`):
  bare mitmdump, the addon with conversation affinity on (its default) and off, each
  request a conversation's turn as Claude Code sends it: its session header (one
  conversation per connection) and a 50 KB body.

The save loop and the slot refresh run once a second and every few seconds of wall
time; under valgrind a second holds about 60 times fewer requests than at full speed, so
they are moved out of the window (kimi_flush_interval and kimi_slot_ttl set long) and
what is counted is the per-request work.

`--agent` sends agent traffic instead of small requests: 40 KB bodies naming a
conversation (Claude Code's metadata.user_id), streamed answers of 20 SSE events that
report their usage; its arms are bare, streamer, addon (and before), and the addon is
held to 0.97 of the streamer (issue 26).

    python bench/instructions.py [--quick] [--requests N] [--redis] [--arms a,b,...] [--keep DIR]
                                 [--agent] [--before CHECKOUT]
"""

from __future__ import annotations

import glob
import shutil
import http.client
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402
from bench import _team as T  # noqa: E402
from testbed.redis_server import RedisServer  # noqa: E402

ARMS = ("bare", "hooks", "streamer", "passthrough", "addon", "before", "redis", "bare-sessions", "sessions",
        "sessions-off")
AGENT_TARGET_RATIO = 0.97  # issue 26's bar with usage reading on, vs the streamer floor
AGENT_DELTAS = 15  # 20 SSE events an answer
AGENT_BODY_BYTES = 40_000
# Arms whose requests are a conversation's turns as Claude Code sends them (issue 25): its
# session header, one conversation per connection, and a 50 KB body.
SESSION_ARMS = ("bare-sessions", "sessions", "sessions-off")
SESSION_BODY = json.dumps({**C.REQUEST_BODY, "messages": [
    {"role": "user", "content": "x" * 1000} for _ in range(50)],
    "metadata": {"user_id": json.dumps({"device_id": "f" * 64, "session_id": "s"})}}).encode()

CONNECTIONS = (1, 16)
TARGET_RATIO = 0.95  # issue 9's bar for the addon vs bare mitmdump
TEAM_TARGET_RATIO = 0.9  # issue 12's bar for the Redis store vs the file store
LONG_S = 3600  # the periodic work, out of the window
WARM_UP_PER_CONNECTION = 10
IDLE_S = 10.0

HOOKS_SCRIPT = """\
class Hooks:
    def requestheaders(self, flow): pass
    def request(self, flow): pass
    def responseheaders(self, flow): pass
    def response(self, flow): pass

addons = [Hooks()]
"""

# The floor for agent traffic: bare mitmdump buffers SSE, so a proxy for agents must at
# least stream it; this script does only that.
STREAMER_SCRIPT = """\
class Streamer:
    def responseheaders(self, flow):
        if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
            flow.response.stream = True

addons = [Streamer()]
"""


def agent_body() -> bytes:
    """A Claude Code turn: ~40 KB of conversation, naming its session, streamed."""
    text = "x" * (AGENT_BODY_BYTES - 400)
    return json.dumps({**C.REQUEST_BODY, "stream": True,
                       "metadata": {"user_id": "user_0123abcd_account__session_9f1c2d3e-4b5a-6789-abcd-ef0123456789"},
                       "messages": [{"role": "user", "content": text}]}).encode()


@dataclass
class Counted:
    arm: str
    per_request: dict[int, float]  # connections -> instructions per request (mitmdump + redis)
    redis_share: dict[int, float]  # … of which redis-server's
    seconds: dict[int, float]  # how long the counted requests took
    idle_per_s: float  # instructions a second with no request at all
    evalsha: dict[int, float]  # scripts run in Redis per request


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"]


def zero(pid: int) -> None:
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True, timeout=120)


def dumped(pid: int, out: Path) -> int:
    """Dump the counters since the last zero; the instructions in that dump."""
    before = set(glob.glob(f"{out}.{pid}.*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True, timeout=120)
    (new,) = set(glob.glob(f"{out}.{pid}.*")) - before
    for line in Path(new).read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise SystemExit(f"bench: no summary in {new}")


class Clients:
    """`connections` keep-alive connections to a proxy, kept open from the warm-up to the
    count, so the count holds requests and nothing of opening connections."""

    body = json.dumps(C.REQUEST_BODY).encode()

    def __init__(self, port: int, connections: int, sessions: bool = False) -> None:
        self.conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=600) for _ in range(connections)]
        self.pool = ThreadPoolExecutor(connections)
        self.sessions = sessions

    def send(self, requests: int) -> None:
        """`requests` POSTs spread over the connections, all at once; each answered 200."""
        n = len(self.conns)
        shares = [requests // n + (1 if i < requests % n else 0) for i in range(n)]
        list(self.pool.map(self._send_on, self.conns, shares, range(n)))

    def _send_on(self, conn: http.client.HTTPConnection, count: int, number: int) -> None:
        headers = {"content-type": "application/json", "x-api-key": C.PLACEHOLDER_KEY}
        body: bytes = self.body
        if self.sessions:
            headers["x-claude-code-session-id"] = f"0b7c6a1e-59f4-4b8e-9a51-{number:012d}"
            headers["user-agent"] = "claude-cli/2.1.332 (external, cli)"
            body = SESSION_BODY
        for _ in range(count):
            conn.request("POST", C.MESSAGES_PATH, body, headers)
            answer = conn.getresponse()
            said = answer.read()
            if answer.status != 200:
                raise SystemExit(f"bench: answered {answer.status}: {said[:200]!r}")

    def close(self) -> None:
        self.pool.shutdown()
        for conn in self.conns:
            conn.close()


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def idle_rate(pids: list[int], out: Path, work: Path) -> list[float]:
    """Instructions a second each process runs with no request: timers, loops."""
    for pid in pids:
        zero(pid)
    started = time.monotonic()
    time.sleep(IDLE_S)
    took_s = time.monotonic() - started
    return [dumped(pid, out if i == 0 else work / "cg-redis-server") / took_s for i, pid in enumerate(pids)]


def count(arm: str, work: Path, fake_port: int, requests: int, before: Path | None = None) -> Counted:
    out = work / f"cg-{arm}"
    options: dict[str, object] = {"kimi_flush_interval": LONG_S}
    scripts: list[Path] = []
    with ExitStack() as stack:
        redis: RedisServer | None = None
        if arm == "redis":
            (work / "redis").mkdir()
            redis = RedisServer(work / "redis", wrapper=callgrind(work / "cg-redis-server"))
            redis.start()
            stack.callback(redis.stop)
            T.fill_redis(redis.url)
            accounts = work / "unused-accounts.json"
            options.update(kimi_store=redis.url, kimi_slot_ttl=LONG_S, kimi_max_in_flight=T.MAX_IN_FLIGHT)
        else:
            accounts = C.make_accounts_file(work / f"accounts-{arm}.json", T.KEYS, T.STRATEGY)
        if arm == "hooks":
            scripts.append(work / "hooks.py")
            scripts[0].write_text(HOOKS_SCRIPT)
        if arm == "streamer":
            scripts.append(work / "streamer.py")
            scripts[0].write_text(STREAMER_SCRIPT)
        if arm == "before":  # the addon of another checkout (--before), as the addon arm runs it
            assert before is not None
            scripts.append(before / "kimi_rotator_addon.py")
            options.update(kimi_accounts=str(accounts), kimi_hosts="127.0.0.1", kimi_status="off",
                           kimi_usage_interval=0)
        if arm == "passthrough":
            options["kimi_hosts"] = "api.kimi.com"
        if arm == "sessions-off":
            options["kimi_affinity"] = "false"
        proxy = C.start_proxy(work, arm, fake_port,
                              addon=arm in ("passthrough", "addon", "redis", "sessions", "sessions-off"),
                              accounts=accounts,
                              options=options if arm not in ("bare", "hooks", "streamer", "bare-sessions") else {},
                              scripts=scripts, wrapper=callgrind(out))
        stack.callback(stop, proxy.process)
        port = int(proxy.url.rsplit(":", 1)[1])
        pids = [proxy.process.pid] + ([redis.proc.pid] if redis is not None and redis.proc else [])
        per_request: dict[int, float] = {}
        redis_share: dict[int, float] = {}
        seconds: dict[int, float] = {}
        scripts: dict[int, float] = {}
        idle: list[float] = []
        for connections in CONNECTIONS:
            clients = Clients(port, connections, sessions=arm in SESSION_ARMS)
            clients.send(WARM_UP_PER_CONNECTION * connections)  # every connection opened, upstream too
            for pid in pids:
                zero(pid)
            scripts_before = T.evalsha_calls(redis)
            started = time.monotonic()
            clients.send(requests)
            took_s = time.monotonic() - started
            scripts[connections] = (T.evalsha_calls(redis) - scripts_before) / requests
            counts = [dumped(pid, out if pid == proxy.process.pid else work / "cg-redis-server") for pid in pids]
            clients.close()
            if connections == CONNECTIONS[0]:
                idle = idle_rate(pids, out, work)
            per_request[connections] = sum(counts) / requests
            seconds[connections] = took_s
            redis_share[connections] = (counts[1] / requests) if len(counts) > 1 else 0.0
        return Counted(arm, per_request, redis_share, seconds, sum(idle), scripts)


def compared(what: str, base: Counted, arm: Counted, connections: int, requests: int, target: float,
             note: str = "") -> str:
    """base/arm instructions as counted, and less each one's idle work in the window (what
    a full-speed run, whose seconds hold 60 times more requests, would count)."""
    counted = base.per_request[connections] / arm.per_request[connections]
    busy = [c.per_request[connections] - c.idle_per_s * c.seconds[connections] / requests for c in (base, arm)]
    extra = (arm.per_request[connections] - base.per_request[connections]) / 1e3
    return (f"{what}, {connections:2} connection(s): {counted:.3f} (+{extra:.0f}k instructions a request{note}); "
            f"less idle work {busy[0] / busy[1]:.3f}: target ≥ {target}: {C.verdict(counted >= target)}")


def main() -> int:
    ap = C.parser(__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, help="requests counted per arm and load (default 300; quick 40)")
    ap.add_argument("--redis", action="store_true", help="add the redis arm (the team store)")
    ap.add_argument("--arms", help=f"comma-separated, from {','.join(ARMS)} (default: all but redis; quick: bare,addon)")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="keep callgrind's files there, to read by function")
    ap.add_argument("--agent", action="store_true",
                    help=f"agent traffic: {AGENT_BODY_BYTES // 1000} KB bodies naming a conversation, "
                         f"{AGENT_DELTAS + 5}-event SSE answers; the floor is the streamer arm")
    ap.add_argument("--before", type=Path, metavar="CHECKOUT",
                    help="the 'before' arm runs the addon of this checkout (e.g. a worktree of main)")
    args = ap.parse_args()
    if args.agent:
        Clients.body = agent_body()
    if args.before and not (args.before / "kimi_rotator_addon.py").exists():
        ap.error("--before: no kimi_rotator_addon.py there")
    requests = args.requests or (40 if args.quick else 300)
    default = ("bare", "addon") if args.quick else tuple(a for a in ARMS if a != "redis")
    if args.agent and not args.arms:
        default = ("bare", "streamer", "addon") + (("before",) if args.before else ())
    arms = args.arms.split(",") if args.arms else list(default)
    if "before" in arms and not args.before:
        ap.error("--arms before needs --before CHECKOUT")
    unknown = set(arms) - set(ARMS)
    if unknown or not arms:
        ap.error(f"--arms: choose from {', '.join(ARMS)} (got {args.arms!r})")
    if args.redis and "redis" not in arms:
        arms.append("redis")

    C.print_header("instructions per request: mitmdump under callgrind, per arm",
                   [f"valgrind: {subprocess.run(['valgrind', '--version'], capture_output=True, text=True).stdout.strip()}",
                    f"arms {', '.join(arms)}: {requests} requests counted per load, over {CONNECTIONS} connection(s), "
                    f"after a warm-up; kimi_flush_interval={LONG_S} (the once-a-second save out of the window)"])
    with C.watchdog(3600), C.workdir("instructions") as work, C.fake_kimi("--no-record", *(("--deltas", str(AGENT_DELTAS)) if args.agent else ())) as (_, fake_port):
        # Two at a time: callgrind runs one thread at a time, and these machines have 2 cores.
        with ThreadPoolExecutor(2) as pool:
            counted = {c.arm: c for c in pool.map(lambda a: count(a, work, fake_port, requests, args.before), arms)}
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for dump in work.glob("cg-*.*"):
                shutil.copy(dump, args.keep / dump.name)
            print(f"callgrind's files kept in {args.keep} (callgrind_annotate FILE): per arm and process, "
                  "dump .1 the 1-connection count, .2 idle, .3 the 16-connection count")

    rows = []
    base = counted.get("bare")
    for arm in arms:
        c = counted[arm]
        row: list[object] = [arm]
        for connections in CONNECTIONS:
            row.append(f"{c.per_request[connections] / 1e6:.3f}")
            row.append(f"{base.per_request[connections] / c.per_request[connections]:.3f}" if base else "-")
        row.append("/".join(f"{c.redis_share[n] / 1e3:.0f}k" for n in CONNECTIONS) if arm == "redis" else "-")
        row.append("/".join(f"{c.evalsha[n]:.2f}" for n in CONNECTIONS) if arm == "redis" else "-")
        row.append(f"{c.idle_per_s / 1e3:.0f}k")
        row.append("/".join(f"{c.idle_per_s * c.seconds[n] / requests / 1e3:.0f}k" for n in CONNECTIONS))
        rows.append(row)
    print()
    C.print_table(["arm", "M instr/req, 1 conn", "bare/arm", "M instr/req, 16 conns", "bare/arm",
                   "redis-server's share (1 / 16)", "EVALSHA/req", "idle instr/s", "idle's share (1 / 16)"], rows)
    print()
    if base and "addon" in counted:
        for connections in CONNECTIONS:
            print(compared("addon vs bare", base, counted["addon"], connections, requests, TARGET_RATIO))
    if "streamer" in counted:
        for arm in ("addon", "before"):
            if arm in counted:
                for connections in CONNECTIONS:
                    print(compared(f"{arm} vs streamer", counted["streamer"], counted[arm], connections, requests,
                                   AGENT_TARGET_RATIO))
    if "sessions" in counted and "bare-sessions" in counted:
        for connections in CONNECTIONS:
            print(compared("sessions vs bare-sessions (affinity on, a session header, a 50 KB body)",
                           counted["bare-sessions"], counted["sessions"], connections, requests, TARGET_RATIO))
    if "sessions" in counted and "sessions-off" in counted:
        for connections in CONNECTIONS:
            print(compared("affinity on vs off (sessions vs sessions-off)", counted["sessions-off"],
                           counted["sessions"], connections, requests, TARGET_RATIO))
    if "addon" in counted and "redis" in counted:
        for connections in CONNECTIONS:
            print(compared("redis vs file store", counted["addon"], counted["redis"], connections, requests,
                           TEAM_TARGET_RATIO, " (redis-server included)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
