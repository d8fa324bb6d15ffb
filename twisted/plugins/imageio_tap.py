"""
The twistd plugin: C{twistd -n imageio --conf-dir DIR}.
"""

from twisted.application.service import ServiceMaker

imageio = ServiceMaker(
    "imageio",
    "imageio.tap",
    "ovirt-imageio compatible image transfer daemon",
    "imageio",
)
