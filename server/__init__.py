"""fedmri's server package (see the README's layout). Importing it first checks, through fedmri's
`common`, that all five of fedmri's top-level packages come from one installation."""

import common

if getattr(common, "PACKAGES", None) != ("common", "client", "server", "sites", "simulation"):
    raise ImportError(f"the package 'common' at {common.__file__} is not fedmri's (docs/development.md: Package names)")
