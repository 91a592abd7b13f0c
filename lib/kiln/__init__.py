"""KilnProxy: an SSH reverse proxy for Git and Mercurial hosting.

Modules import in one direction:
errors -> timefmt -> version -> config -> log -> keystore -> commands -> hostkeys -> policy
-> backends -> relay -> sessions -> server -> admin -> cli
Nothing here runs at import time.
"""
