# -*- test-case-name: test.test_daemon -*-
"""
C{imageioctl}: manage tickets through the control service, whose address
is read from the daemon's own conf dir (unix socket or localhost TCP).

A short-lived command line tool, so it uses the standard library's
blocking HTTP client rather than a reactor.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys

from imageio import config as _config

__all__ = ["Client", "Error", "ClientError", "ServerError", "main"]


class Error(Exception):
    """
    Base of this tool's errors.
    """


class ClientError(Error):
    """
    The control service could not be reached.
    """


class ServerError(Error):
    """
    The control service answered with an error.
    """

    def __init__(self, code: int, message: str):
        super().__init__(f"server error {code}: {message}")
        self.code = code
        self.message = message


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Client:
    """
    The control API as Python calls, one connection per request (as vdsm
    and the engine do).
    """

    def __init__(self, cfg, timeout: float = 60):
        self.cfg = cfg
        self.timeout = timeout

    def _connection(self):
        control = self.cfg.control
        if control.transport == "tcp":
            return http.client.HTTPConnection(
                "localhost", control.port, timeout=self.timeout)
        return _UnixHTTPConnection(control.socket, self.timeout)

    def _request(self, method, path, body=None, expect=200):
        con = self._connection()
        try:
            try:
                con.request(method, path, body=body)
                resp = con.getresponse()
                data = resp.read()
            except OSError as e:
                raise ClientError(f"cannot reach the control service: {e}")
        finally:
            con.close()
        if resp.status != expect:
            raise ServerError(resp.status,
                              data.decode("utf-8", "replace").strip())
        return data

    def addTicket(self, ticket: dict) -> None:
        self._request("PUT", "/tickets/" + ticket["uuid"],
                      json.dumps(ticket).encode("utf-8"))

    def getTicket(self, ticketId: str) -> dict:
        return json.loads(self._request("GET", "/tickets/" + ticketId))

    def modTicket(self, ticketId: str, timeout: int) -> None:
        self._request("PATCH", "/tickets/" + ticketId,
                      json.dumps({"timeout": timeout}).encode("utf-8"))

    def delTicket(self, ticketId: str) -> None:
        self._request("DELETE", "/tickets/" + ticketId, expect=204)


def _parser():
    parser = argparse.ArgumentParser(
        prog="imageioctl", description="Manage imageio transfer tickets.")
    parser.add_argument(
        "-c", "--conf-dir", default="/etc/ovirt-imageio",
        help="the daemon's configuration directory (default %(default)s)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("add-ticket", help="add a ticket from a JSON file")
    p.add_argument("filename", help="ticket JSON file ('-' for stdin)")
    p = sub.add_parser("show-ticket", help="show a ticket's status")
    p.add_argument("ticket_id")
    p = sub.add_parser("mod-ticket", help="extend a ticket")
    p.add_argument("ticket_id")
    p.add_argument("--timeout", type=int, required=True,
                   help="seconds from now until the ticket expires")
    p = sub.add_parser("del-ticket", help="remove a ticket")
    p.add_argument("ticket_id")
    return parser


def _readTicket(filename):
    if filename == "-":
        data = sys.stdin.read()
    else:
        with open(filename) as f:
            data = f.read()
    try:
        ticket = json.loads(data)
    except ValueError as e:
        raise Error(f"invalid ticket JSON in {filename}: {e}")
    if not isinstance(ticket, dict) or not isinstance(
            ticket.get("uuid"), str):
        raise Error(f"ticket in {filename} has no 'uuid'")
    return ticket


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        cfg = _config.load(args.conf_dir)
        client = Client(cfg)
        if args.command == "add-ticket":
            client.addTicket(_readTicket(args.filename))
        elif args.command == "show-ticket":
            print(json.dumps(client.getTicket(args.ticket_id), indent=4,
                             sort_keys=True))
        elif args.command == "mod-ticket":
            client.modTicket(args.ticket_id, args.timeout)
        elif args.command == "del-ticket":
            client.delTicket(args.ticket_id)
    except (Error, _config.ConfigError, OSError) as e:
        sys.stderr.write(f"imageioctl: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
