"""``oco datastores list|grant|rotate|revoke``: the operator's hand on specific data stores.

They open the configured core store and data-store providers as the bot does, and
change the same records a running bot reads on every hand-out, so a rotation or a
revocation takes effect for a running bot's callbacks at once: their open sessions end,
and their next ``GetDataStore`` gets the new credentials, or, after a revocation, a
PERMISSION_DENIED until ``oco datastores grant``.
"""

from __future__ import annotations

import argparse
import sys

import trio

from ._admin import local_time, open_configured_store, print_table
from ._audit import AuditLog
from ._config import LoadedConfig
from ._datastores import open_datastores
from ._plugins import Plugins

#: Seconds a command waits for its audit record to reach the store before it gives up on it.
_AUDIT_WAIT = 30.0


async def run(options: argparse.Namespace, loaded: LoadedConfig, plugins: Plugins) -> int:
    """Run ``oco datastores ...``; returns the exit code."""
    async with open_configured_store(loaded, plugins) as store, trio.open_nursery() as nursery:
        audit = AuditLog(store, retention_days=None)
        await nursery.start(audit.run)  # what the commands change is audited, as in the bot
        async with open_datastores(loaded, plugins, store, audit.record) as datastores:
            if options.action == "list":
                grants = await datastores.grants()
                offered = datastores.describe()
                rows = [
                    (g.datastore, g.callback_id, str(g.generation), local_time(g.granted), _state(g.revoked))
                    for g in grants
                ]
                if rows:
                    print_table(("DATA STORE", "CALLBACK", "GENERATION", "SINCE", "STATE"), rows, sys.stdout)
                else:
                    print("no callback holds a data store yet", file=sys.stderr)
                for name, where in offered.items():
                    print(f"offered: {name}: {where}", file=sys.stderr)
                if not offered:
                    print("this config offers no data stores (datastores: [{type: ...}])", file=sys.stderr)
            elif options.action == "grant":
                generation = await datastores.grant(options.callback, options.datastore)
                print(
                    f"callback {options.callback!r} has access to {options.datastore} (generation {generation}); "
                    "it gets its credentials when it asks the bot"
                )
            elif options.action == "rotate":
                generation = await datastores.rotate(options.callback, options.datastore)
                print(
                    f"rotated the credentials of callback {options.callback!r} for {options.datastore} "
                    f"(generation {generation}): the old ones no longer work; the callback gets the new ones "
                    "when it next asks the bot (the Python SDK: await callback.datastore(...))"
                )
            else:
                held = await datastores.revoke(options.callback, options.datastore, drop_data=options.drop_data)
                data = "and deleted its data" if options.drop_data else "(its data is kept)"
                again = f"`oco datastores grant {options.callback} {options.datastore}` gives it back"
                if held:
                    print(f"revoked the access of callback {options.callback!r} to {options.datastore} {data}; {again}")
                else:
                    print(
                        f"callback {options.callback!r} held no access to {options.datastore}; it gets none "
                        f"until granted {data}; {again}"
                    )
        # The change is made; its audit record waits for the store only so long.
        with trio.move_on_after(_AUDIT_WAIT) as waited:
            await audit.flush()
        if waited.cancelled_caught:
            print(
                f"warning: the audit record of this change was not written within {_AUDIT_WAIT:.0f} s "
                "(the store is unavailable); the change itself was made",
                file=sys.stderr,
            )
        nursery.cancel_scope.cancel()
    return 0


def _state(revoked: bool) -> str:
    return "revoked" if revoked else "granted"
