"""`python -m node --demo`: two real nodes on loopback, sessions with a restart, delegation."""
