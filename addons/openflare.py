"""All of OpenFlare as one script, in the documented order: `mitmdump -s addons/openflare.py`.

The same five addons as `-s addons/features.py -s addons/bans.py -s addons/scorer.py -s addons/recorder.py
-s addons/labels.py`, each a fresh instance. One script costs less: mitmproxy walks every script's chain
(script, module, addons) for every event of every flow. Each addon module still loads alone with `-s`.

mitmproxy reloads this file when it changes, not the addon modules it imports: restart after editing those.
"""

from addons import bans
from addons import features
from addons import labels
from addons import recorder
from addons import scorer

# The order of addons/common.py's ADDON_ORDER: features (client IP, feature string), bans (refuse banned IPs
# first), scorer, recorder, labels.
addons = [features.FeatureExtractor(), bans.IpBans(), scorer.Scorer(), recorder.Recorder(), labels.Labeler()]
