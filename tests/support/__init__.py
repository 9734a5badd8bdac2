"""What the tests share, in one place: every helper, constant and fake a test imports
lives in this package, and no test module imports from another. Fixtures are the
exception by pytest's design: they are reached by name, never imported, and live in
tests/conftest.py (built from what is here).

- accounts: the tests' ``NOW`` and ``KEYS``, ``fake_key``, and ``write_pool`` (an
  accounts file from a list of keys).
- in_process: the addon in taddons with a fake upstream (``FakeUpstream``) and Kimi's
  answers (``kimi_error``, ``success``); the ``proxy`` fixture is built on it.
- harness: running the CLI, reading SSE, what a proxy left on disk, waiting (``poll``),
  the addon script and the loopback DNS shim mitmdump loads.
- e2e: an httpx client and a request to a running mitmdump, as the end-to-end tests send them.
- modes: the same in each of mitmdump's modes (reverse, regular, regular with TLS).
- redis_acl: the README's Redis ACL user on a real redis-server.
- plugin_files: accounts files as the TypeScript plugin writes them.
- agents: what each coding agent's requests look like (User-Agents, Kimi CLI's body).
- bench: running a benchmark script with --quick and reading its figures.
- tiers: the pytest plugin that keeps the fast tier fast.

What the tests and the benchmarks both use is in testbed/ (the fake Kimi, processes,
the fake clock): bench/ imports nothing from tests/.
"""
