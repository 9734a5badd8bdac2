"""What the script mitmproxy loads with `-s` binds besides its addon: every hook name, to
None.

mitmproxy looks each hook up on the script's module itself (it is an addon in the chain)
for every event of every flow, and each flow event is followed by an `update` event: some
eight look-ups a request. On Python 3.11 a name a module lacks costs an AttributeError
made and dropped each time (~1.2 µs, against 0.04 for a name it has; 3.12 no longer makes
one); a hook bound to None is found, and mitmproxy skips it as it skips a missing one
(figures: bench/README.md)."""

from __future__ import annotations

from mitmproxy import hooks

# Hook names mitmproxy warns about when an addon has one (deprecated: AddonManager.register).
_DEPRECATED = frozenset({"add_log"})


def hooks_as_none(namespace: dict[str, object]) -> None:
    """Bind every hook name mitmproxy knows that `namespace` (a script module's globals)
    does not define to None. Called as the script loads, when mitmproxy has imported every
    module that declares a hook."""
    for name in hooks.all_hooks.keys() - _DEPRECATED:
        namespace.setdefault(name, None)
