"""KilnProxy: an SSH reverse proxy for Git and Mercurial hosting.

Modules import in one direction:
errors -> timefmt -> version -> config -> log -> keystore -> commands -> hostkeys -> sshcompat -> policy
-> backends -> relay -> sessions -> limits -> memory -> metrics -> server -> sampler -> admin -> cli
Nothing here runs at import time.
"""
