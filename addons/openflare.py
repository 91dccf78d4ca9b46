"""All of OpenFlare as one script, in the documented order: `mitmdump -s addons/openflare.py`.

The same addons as `-s addons/deployment.py -s addons/features.py -s addons/bans.py -s addons/scorer.py
-s addons/recorder.py -s addons/labels.py -s addons/flowcap.py -s addons/metrics.py`, each a fresh instance, served by this module's own hook functions
(`common.bundle`): mitmproxy walks every script's addons on every event of every flow, and module-level
hooks end that walk here, where five scripts (or an `addons` list) would add a stop per addon.
Each addon module still loads alone with `-s`.

mitmproxy reloads this file when it changes, not the addon modules it imports: restart after editing those.
"""

from addons import bans
from addons import common
from addons import deployment
from addons import features
from addons import flowcap
from addons import labels
from addons import metrics
from addons import recorder
from addons import scorer

# The order of addons/common.py's ADDON_ORDER: deployment (public clients, upstream check; no traffic hooks),
# features (client IP, the request's fields), bans (refuse banned IPs first), scorer, recorder, labels, flowcap
# (mitmweb's flow cap; no traffic hooks), metrics (last: counts what each flow ended as; reads the others'
# counters at scrape time). Not named `addons`: mitmproxy would then call each of them twice.
BUNDLED = [
    deployment.Deployment(),
    features.FeatureExtractor(),
    bans.IpBans(),
    scorer.Scorer(),
    recorder.Recorder(),
    labels.Labeler(),
    flowcap.FlowCap(),
]
BUNDLED.append(metrics.Metrics(peers=list(BUNDLED)))
globals().update(common.bundle(*BUNDLED))
