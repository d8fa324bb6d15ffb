"""
The C{imageio-tls:} strports endpoint (see L{imageio.endpoints}).
"""

from imageio.endpoints import TLSServerParser

imageioTLS = TLSServerParser()
