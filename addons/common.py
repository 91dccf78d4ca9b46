"""What the OpenFlare addons share: flow metadata keys, the refusal body, and the addon order.

Addons never import each other; they talk only through these `flow.metadata` keys.
Values stored under them are plain Python (str, int, float, bool, None, list, dict) so flows can be saved.
"""

# Written by FeatureExtractor (addons/features.py).
FEATURES = "openflare.features"  # str: the normalised feature string
CLIENT_IP = "openflare.client_ip"  # str: the client address after trusted-proxy resolution

# Written by Scorer (addons/scorer.py).
LOCAL_SCORE = "openflare.local_score"  # int 1-10: the local model's score
SCORE = "openflare.score"  # int 1-10: the final (ensemble) score
VERDICT = "openflare.verdict"  # str: one of VERDICTS
MODEL_VERSION = "openflare.model_version"  # str
SCORE_MS = "openflare.score_ms"  # float: time spent scoring, milliseconds
REASON = "openflare.reason"  # str: why the verdict is what it is (never sent to the client)

VERDICT_PASS = "pass"
VERDICT_BLOCK = "block"
VERDICT_ERROR = "error"  # scoring failed; the fail policy decided
VERDICTS = (VERDICT_PASS, VERDICT_BLOCK, VERDICT_ERROR)

# The one refusal every addon sends: it reveals neither score nor reason.
BLOCK_STATUS = 403
BLOCK_BODY = b"Forbidden\n"
BLOCK_HEADERS = {"content-type": "text/plain; charset=utf-8", "cache-control": "no-store"}

# mitmweb marker for refused flows.
BLOCK_MARKER = ":no_entry:"

# The documented order in which the addons are loaded (`-s` order).
ADDON_ORDER = ("addons/features.py", "addons/scorer.py")
