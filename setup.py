"""
Packaging for tximageio: the import package is C{imageio}, the distribution
C{tximageio} (never to collide with the unrelated C{imageio} on PyPI).
"""

import re

from setuptools import find_packages, setup

with open("imageio/__init__.py") as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

with open("README.md") as f:
    LONG_DESCRIPTION = f.read()

setup(
    name="tximageio",
    version=VERSION,
    description="Twisted implementation of the ovirt-imageio image "
                "transfer API (daemon, client, common)",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    license="GPL-2.0-or-later",
    python_requires=">=3.10",
    packages=find_packages(include=["imageio", "imageio.*"])
    + ["twisted.plugins"],
    package_data={"twisted": ["plugins/imageio_tap.py",
                             "plugins/imageio_endpoints.py"]},
    install_requires=[
        # The versions imageio.compat was checked against (its private
        # Twisted and pyOpenSSL names; test_compat tries each).
        "twisted[tls]>=26.10,<27",
        "pyopenssl>=26.4,<27",
        "service-identity",
        "treq",
        "prometheus-client>=0.17",
    ],
    extras_require={
        "test": ["pytest", "pytest-twisted", "pytest-timeout", "hypothesis"],
    },
    entry_points={
        "console_scripts": [
            "imageioctl = imageio.ctl:main",
            "imageio = imageio.client.cli:main",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Systems Administration",
    ],
)
