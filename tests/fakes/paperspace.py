#!/usr/bin/env python3
"""A stand-in for Paperspace's public API (https://api.paperspace.com/v1), for tests.

No real Paperspace API can run here, so this follows the published reference
(https://docs.digitalocean.com/reference/paperspace/api-reference/) for the calls the driver
makes: machines (create, get, list, start, stop, restart, delete), machine events, machine
availability, OS and custom templates, startup scripts. Every /v1 request needs
`Authorization: Bearer <key>`; errors are `{"code", "message"}` as the reference's error
response; lists are paginated with `limit`, `after`, `hasMore` and `nextPage`.

What the reference does not say, and this fake assumes: the error codes (the pspace CLI's
tRPC-style names: UNAUTHORIZED, NOT_FOUND, BAD_REQUEST, TOO_MANY_REQUESTS), the server's page
size when `limit` is absent (20), and how a create refused for capacity looks (HTTP 400,
BAD_REQUEST, a message saying the type is out of capacity).

Usage: paperspace.py [--key KEY] [--lifetime SECONDS]. Listens on a random loopback port and
prints it alone on the first line of stdout. Stops when stdin closes or after the lifetime.

Test controls (no auth, not recorded), all JSON:
  GET  /_fake/requests          every /v1 request so far: method, path, query, authorization,
                                body (parsed JSON or text), status answered
  POST /_fake/config            {"page_size": N, "no_capacity": [types], "capacity_race":
                                [types], "rate_limit": {"METHOD /v1/path": count},
                                "retry_after": "1", "advance_after": seconds}
  POST /_fake/custom-templates  {"id", "name", ...}: adds a custom template
  GET  /_fake/state             machines, startup scripts (with their text) and templates
"""

import argparse
import itertools
import json
import random
import string
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

REGIONS = {"ny2", "ca1", "ams1"}
LOCK = threading.Lock()


def now_iso():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def new_id(prefix):
    return prefix + "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(7))


class State:
    def __init__(self, key):
        self.key = key
        self.requests = []
        self.machines = {}  # id -> machine
        self.events = {}  # id -> event
        self.scripts = {}  # id -> script (with its text, kept for the tests)
        self.seq = itertools.count()
        self.config = {
            "page_size": 20,
            "no_capacity": [],
            "capacity_race": [],
            "rate_limit": {},
            "retry_after": "1",
            "advance_after": 0.2,
        }
        self.os_templates = [
            self.template("tubuntu2204", "Ubuntu 22.04 Server", None),
            self.template("tmlinabox22", "ML-in-a-Box Ubuntu 22.04", None, size=100),
        ]
        self.custom_templates = []

    def template(self, tid, name, region, size=50, types=None):
        # Every type of the driver's built-in catalog but P4000, so that the template's list
        # matters.
        types = types or [
            "C4", "C5", "C6", "C7", "C8", "C9", "C10", "RTX4000", "P5000", "RTX5000", "A4000",
            "P6000", "A5000", "A6000", "V100", "A100-80G", "H100",
        ]
        t = {
            "id": tid,
            "name": name,
            "agentType": "LinuxHeadless",
            "operatingSystemLabel": "Ubuntu 22.04",
            "defaultSizeGb": size,
            "availableMachineTypes": [{"machineTypeLabel": m, "isAvailable": True} for m in types],
            "dtCreated": now_iso(),
        }
        if region:
            t["region"] = region
            t["parentMachineId"] = new_id("ps")
        return t

    # Machines move through their states as time passes, as real ones do.
    def advance(self, m):
        wait = self.config["advance_after"]
        if time.time() - m["_changed"] < wait:
            return
        nxt = {"provisioning": "ready", "starting": "ready", "stopping": "off", "restarting": "ready"}
        if m["state"] in nxt:
            m["state"] = nxt[m["state"]]
            m["_changed"] = time.time()
            ev = self.events.get(m["_event"])
            if ev and ev["state"] != "done":
                ev["state"] = "done"
                ev["dtFinished"] = now_iso()

    def event(self, name, machine_id):
        ev = {
            "id": new_id("ev"),
            "name": name,
            "state": "in progress",
            "machineId": machine_id,
            "dtCreated": now_iso(),
            "dtStarted": now_iso(),
            "dtFinished": None,
            "error": None,
        }
        self.events[ev["id"]] = ev
        return ev


def public(m):
    return {k: v for k, v in m.items() if not k.startswith("_")}


def page(items, query, state):
    """The reference's pagination: `after` is the cursor of the previous page's `nextPage`."""
    try:
        limit = int(query.get("limit", ["20"])[0])
    except ValueError:
        return None
    if limit < 1 or limit > 120:
        return None
    limit = min(limit, state.config["page_size"])
    start = 0
    after = query.get("after", [None])[0]
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            return None
        start = ids.index(after) + 1
    chunk = items[start : start + limit]
    more = start + limit < len(items)
    body = {"hasMore": more, "items": chunk}
    if more:
        body["nextPage"] = chunk[-1]["id"]
    return body


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-paperspace/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    # -- plumbing ------------------------------------------------------------------------
    def reply(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        return status

    def error(self, status, code, message, headers=None):
        return self.reply(status, {"code": code, "message": message}, headers)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return None, raw
        try:
            return json.loads(raw), raw
        except ValueError:
            return raw.decode("utf-8", "replace"), raw

    def handle_any(self, method):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        body, _ = self.read_body()
        state = self.server.state
        if url.path.startswith("/_fake/"):
            with LOCK:
                return self.control(method, url.path, body, state)
        with LOCK:
            record = {
                "method": method,
                "path": url.path,
                "query": {k: v[0] for k, v in query.items()},
                "authorization": self.headers.get("Authorization"),
                "body": body,
                "status": None,
            }
            state.requests.append(record)
            record["status"] = self.api(method, url.path, query, body, state)

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")

    def do_PUT(self):
        self.handle_any("PUT")

    def do_PATCH(self):
        self.handle_any("PATCH")

    def do_DELETE(self):
        self.handle_any("DELETE")

    # -- test controls -------------------------------------------------------------------
    def control(self, method, path, body, state):
        if method == "GET" and path == "/_fake/requests":
            return self.reply(200, state.requests)
        if method == "POST" and path == "/_fake/config":
            state.config.update(body or {})
            return self.reply(200, state.config)
        if method == "POST" and path == "/_fake/custom-templates":
            b = body or {}
            t = state.template(b["id"], b["name"], b.get("region", "ny2"), b.get("defaultSizeGb", 50), b.get("types"))
            state.custom_templates.insert(0, t)  # newest first, as the API's default order
            return self.reply(200, t)
        if method == "GET" and path == "/_fake/state":
            for m in state.machines.values():
                state.advance(m)
            return self.reply(
                200,
                {
                    "machines": [public(m) for m in state.machines.values()],
                    "startupScripts": list(state.scripts.values()),
                    "customTemplates": state.custom_templates,
                },
            )
        return self.error(404, "NOT_FOUND", f"no control {method} {path}")

    # -- the API -------------------------------------------------------------------------
    def api(self, method, path, query, body, state):
        if not path.startswith("/v1/"):
            return self.error(404, "NOT_FOUND", f"No route for {method} {path}")
        auth = self.headers.get("Authorization") or ""
        if auth != f"Bearer {state.key}":
            return self.error(401, "UNAUTHORIZED", "Authentication failed: the API key is missing or not valid")
        limited = state.config["rate_limit"]
        route = f"{method} {path}"
        if limited.get(route, 0) > 0:
            limited[route] -= 1
            return self.error(
                429,
                "TOO_MANY_REQUESTS",
                "Too many requests, slow down",
                {"Retry-After": str(state.config["retry_after"])},
            )
        parts = path[len("/v1/") :].strip("/").split("/")
        try:
            return self.route(method, parts, query, body, state)
        except (KeyError, TypeError, ValueError) as e:
            return self.error(400, "BAD_REQUEST", f"Invalid input: {e}")

    def route(self, method, parts, query, body, state):
        p = parts
        if p == ["machines"] and method == "GET":
            ms = [m for m in state.machines.values() if not m["_deleted"]]
            for m in ms:
                state.advance(m)
            for f in ("name", "region", "machineType", "agentType"):
                if f in query:
                    ms = [m for m in ms if m[f] == query[f][0]]
            ms.sort(key=lambda m: m["_seq"], reverse=True)
            res = page([public(m) for m in ms], query, state)
            return self.reply(200, res) if res else self.error(400, "BAD_REQUEST", "Invalid cursor or limit")
        if p == ["machines"] and method == "POST":
            return self.create_machine(body or {}, state)
        if len(p) == 2 and p[0] == "machines":
            m = state.machines.get(p[1])
            if not m or m["_deleted"]:
                return self.error(404, "NOT_FOUND", f"Machine {p[1]} not found")
            state.advance(m)
            if method == "GET":
                return self.reply(200, public(m))
            if method == "DELETE":
                m["_deleted"] = True
                m["dtDeleted"] = now_iso()
                ev = state.event("deactivate", m["id"])
                ev["state"] = "done"
                for s in state.scripts.values():
                    if m["id"] in s["assignedMachineIds"]:
                        s["assignedMachineIds"].remove(m["id"])
                return self.reply(200, {"event": ev, "data": public(m)})
        if len(p) == 3 and p[0] == "machines" and method == "PATCH" and p[2] in ("start", "stop", "restart"):
            m = state.machines.get(p[1])
            if not m or m["_deleted"]:
                return self.error(404, "NOT_FOUND", f"Machine {p[1]} not found")
            state.advance(m)
            m["state"] = {"start": "starting", "stop": "stopping", "restart": "restarting"}[p[2]]
            m["_changed"] = time.time()
            ev = state.event(p[2], m["id"])
            m["_event"] = ev["id"]
            return self.reply(200, {"event": ev, "data": public(m)})
        if len(p) == 2 and p[0] == "machine-events" and method == "GET":
            for m in state.machines.values():
                state.advance(m)
            ev = state.events.get(p[1])
            return self.reply(200, ev) if ev else self.error(404, "NOT_FOUND", f"Event {p[1]} not found")
        if p == ["machine-availability"] and method == "GET":
            mt, region = query.get("machineType", [None])[0], query.get("region", [None])[0]
            if not mt or not region:
                return self.error(400, "BAD_REQUEST", "machineType and region are required")
            if region.lower() not in REGIONS:
                return self.error(400, "BAD_REQUEST", f"Invalid region: {region}")
            return self.reply(200, {"available": mt not in state.config["no_capacity"]})
        if p in (["os-templates"], ["custom-templates"]) and method == "GET":
            items = state.os_templates if p == ["os-templates"] else state.custom_templates
            if "name" in query:
                items = [t for t in items if t["name"] == query["name"][0]]
            res = page(items, query, state)
            return self.reply(200, res) if res else self.error(400, "BAD_REQUEST", "Invalid cursor or limit")
        if p == ["startup-scripts"] and method == "POST":
            b = body or {}
            if not isinstance(b.get("name"), str) or not isinstance(b.get("script"), str):
                return self.error(400, "BAD_REQUEST", "name and script are required")
            s = {
                "id": new_id("scr"),
                "name": b["name"],
                "description": None,
                "isEnabled": True,
                "isRunOnce": bool(b.get("isRunOnce", False)),
                "assignedMachineIds": [],
                "dtCreated": now_iso(),
                "dtDeleted": None,
                "_script": b["script"],
            }
            state.scripts[s["id"]] = s
            return self.reply(200, {k: v for k, v in s.items() if not k.startswith("_")})
        if len(p) == 2 and p[0] == "startup-scripts":
            s = state.scripts.get(p[1])
            if not s:
                return self.error(404, "NOT_FOUND", f"Startup script {p[1]} not found")
            shown = {k: v for k, v in s.items() if not k.startswith("_")}
            if method == "GET":
                return self.reply(200, shown)
            if method == "DELETE":
                del state.scripts[p[1]]
                return self.reply(200, shown)
        return self.error(404, "NOT_FOUND", f"No route for {method} /v1/{'/'.join(p)}")

    def create_machine(self, b, state):
        for field, kind in (("name", str), ("machineType", str), ("templateId", str), ("region", str)):
            if not isinstance(b.get(field), kind) or not b[field]:
                return self.error(400, "BAD_REQUEST", f"{field} is required")
        if not isinstance(b.get("diskSize"), (int, float)):
            return self.error(400, "BAD_REQUEST", "diskSize is required")
        if b["diskSize"] not in (50, 100, 250, 500, 1000, 2000, 5000, 10000):
            return self.error(400, "BAD_REQUEST", f"Invalid diskSize: {b['diskSize']}")
        region = b["region"].lower()
        if region not in REGIONS:
            return self.error(400, "BAD_REQUEST", f"Invalid region: {b['region']}")
        templates = {t["id"]: t for t in state.os_templates + state.custom_templates}
        t = templates.get(b["templateId"])
        if not t:
            return self.error(404, "NOT_FOUND", f"Template {b['templateId']} not found")
        if b["diskSize"] < (t.get("defaultSizeGb") or 0):
            return self.error(400, "BAD_REQUEST", "diskSize is smaller than the template's disk")
        sid = b.get("startupScriptId")
        if sid is not None and sid not in state.scripts:
            return self.error(404, "NOT_FOUND", f"Startup script {sid} not found")
        mt = b["machineType"]
        if mt in state.config["no_capacity"] or mt in state.config["capacity_race"]:
            return self.error(400, "BAD_REQUEST", f"Machine type {mt} is out of capacity in {region}; try another type or region")
        mid = new_id("ps")
        start = b.get("startOnCreate", True)
        ev = state.event("create", mid)
        m = {
            "id": mid,
            "name": b["name"],
            "state": "provisioning" if start else "off",
            "os": t["operatingSystemLabel"],
            "machineType": mt,
            "agentType": "LinuxHeadless",
            "cpus": 8,
            "ram": 32 * 2**30,
            "storageTotal": int(b["diskSize"]) * 2**30,
            "storageUsed": 0,
            "accelerators": [],
            "region": region,
            "privateIp": "10.0.0.%d" % (len(state.machines) + 2),
            "networkId": b.get("networkId"),
            "publicIp": "203.0.113.%d" % (len(state.machines) + 2) if b.get("publicIpType", "dynamic") != "none" else None,
            "publicIpType": b.get("publicIpType", "dynamic"),
            "autoShutdownEnabled": bool(b.get("autoShutdownEnabled", False)),
            "autoShutdownTimeout": b.get("autoShutdownTimeout"),
            "autoShutdownForce": b.get("autoShutdownForce"),
            "autoSnapshotEnabled": False,
            "autoSnapshotFrequency": None,
            "autoSnapshotSaveCount": None,
            "updatesPending": False,
            "restorePointEnabled": False,
            "restorePointFrequency": None,
            "restorePointSnapshotId": None,
            "usageRate": 0,
            "storageRate": 0,
            "dtCreated": now_iso(),
            "dtModified": now_iso(),
            "dtDeleted": None,
            "reservation": None,
            "_seq": next(state.seq),
            "_changed": time.time(),
            "_event": ev["id"],
            "_deleted": False,
        }
        state.machines[mid] = m
        if sid is not None:
            state.scripts[sid]["assignedMachineIds"].append(mid)
        return self.reply(200, {"event": ev, "data": public(m)})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--key", default="test-key", help="the API key the fake accepts")
    ap.add_argument("--lifetime", type=float, default=600, help="seconds before it stops by itself")
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.state = State(args.key)
    print(server.server_address[1], flush=True)

    def stop_on_eof():
        sys.stdin.read()
        server.shutdown()

    threading.Thread(target=stop_on_eof, daemon=True).start()
    timer = threading.Timer(args.lifetime, server.shutdown)
    timer.daemon = True
    timer.start()
    server.serve_forever()


if __name__ == "__main__":
    main()
