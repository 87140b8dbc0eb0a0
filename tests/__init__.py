"""smtpproxy's tests.

Hypothesis profiles: "ci" (the default) keeps property tests quick; set
HYPOTHESIS_PROFILE=long for a fuzzing run of a hundred thousand examples.
"""

import os

from hypothesis import settings

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("long", max_examples=100_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
