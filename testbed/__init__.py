"""What the tests and the benchmarks both run: the fake Kimi server (`fake_kimi`), real
mitmdump and fake Kimi processes (`processes`), a real redis-server (`redis_server`) and
mitmproxy's hooks called in process (`hooks`). Nothing here imports rotator or tests."""
