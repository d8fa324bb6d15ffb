"""
Twisted protocol implementations used by the daemon and the client.
"""
