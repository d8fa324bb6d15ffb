"""
The HTTP front end: requests, resource trees and response helpers.
"""
