"""OpenFlare: mitmproxy addons (one per module) and the plain modules they share.

Inside mitmdump or mitmweb, this package's first import (when the first OpenFlare script loads: the bundle
addons/openflare.py or any addon alone, before any addon module runs) calls `addons.startup.install` once:
`--set` wins over the options file, and unknown or wrongly typed `openflare_*` keys stop startup with the
nearest valid name. Anywhere else (scripts/, tests) the import does nothing more.
"""


def _startup() -> None:
    from mitmproxy import ctx

    master = getattr(ctx, "master", None)
    if master is not None:
        from addons import startup

        startup.install(master)


_startup()
