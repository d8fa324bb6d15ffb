# -*- test-case-name: test.test_version -*-
"""
tximageio: a Twisted implementation of the ovirt-imageio wire API.
"""

__version__ = "0.1.0"
