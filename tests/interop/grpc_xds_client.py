#!/usr/bin/env python3
"""A real gRPC proxyless client (grpcio) calling shop.Payment/Pay over xDS.

The interop tests (tests/support/python.rs) run this against an in-process
mesh-control: grpcio reads the bootstrap named by GRPC_XDS_BOOTSTRAP itself,
resolves the `xds:///...` target through LDS -> RDS -> CDS -> EDS (gRFC A27/A28)
and balances the calls. We only count where they landed.

Only `grpcio` is needed (no protobuf package, no generated code): the two tiny
messages of proto/shop.proto are encoded and decoded by hand below, so keep them
in step with that file.

Usage:
    grpc_xds_client.py TARGET N [--deadline SECONDS] [--header KEY=VALUE ...]
                       [--linger SECONDS] [--xds-creds]

Prints exactly one JSON line on stdout and exits 0, whatever happened:
    {"ok": n_ok, "errors": {"UNAVAILABLE": 2}, "by_version": {"v1": a, "v2": b},
     "by_served_by": {"127.0.0.1:4100": a}, "first_error": "..." or null,
     "ready": true, "attempted": n, "elapsed_ms": 1234}
Errors are keyed by gRPC status code name (plus NO_BOOTSTRAP and SCRIPT_ERROR).
When the channel does not become ready in time, `ready` is false and one probe
call reports the channel's own error (its code and details) in `first_error`.
Exit 2 means bad arguments (argparse).
With --linger, the line is printed as soon as the calls are done and the channel
(with its xDS stream) stays open that long before the exit, so a test can read
the control server's view of this client (e.g. /status) meanwhile and then kill it.
"""

import argparse
import json
import os
import sys
import time

PAY_METHOD = "/shop.Payment/Pay"
# Time left for one call once the channel is ready (bounded by the deadline).
PER_CALL_TIMEOUT_S = 5.0
# The probe call made when the channel did not become ready.
PROBE_TIMEOUT_S = 2.0


# --- protobuf wire format, just enough for PayRequest / PayReply ---------------

def _varint(value):
    """Encodes a non-negative int (or an int64 as two's complement) as a varint."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_pay_request(order_id, cents):
    """PayRequest{string order_id = 1; int64 cents = 2;}"""
    raw = order_id.encode("utf-8")
    out = b"\x0a" + _varint(len(raw)) + raw  # field 1, wire type 2
    if cents:
        out += b"\x10" + _varint(cents)  # field 2, wire type 0
    return out


def _read_varint(data, pos):
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def decode_fields(data):
    """Yields (field_number, value) for every field; length-delimited values are bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated length-delimited field")
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError("unsupported wire type %d" % wire)
        yield field, value


def decode_pay_reply(data):
    """PayReply{string served_by = 1; string version = 2;} as a dict."""
    reply = {"served_by": "", "version": ""}
    for field, value in decode_fields(data):
        if field == 1 and isinstance(value, bytes):
            reply["served_by"] = value.decode("utf-8", "replace")
        elif field == 2 and isinstance(value, bytes):
            reply["version"] = value.decode("utf-8", "replace")
    return reply


# --- the client ------------------------------------------------------------------

_emitted = False


def _emit(report):
    """Prints the report line, once (a lingering run prints it before it lingers)."""
    global _emitted
    if _emitted:
        return
    _emitted = True
    sys.stdout.write(json.dumps(report, sort_keys=True) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()


def _status_of(error):
    """(code name, details) of a grpc.RpcError, or of anything else raised."""
    code = getattr(error, "code", None)
    if callable(code):
        try:
            name = code().name
            details = error.details() if callable(getattr(error, "details", None)) else ""
            return name, "%s: %s" % (name, details)
        except Exception:  # noqa: BLE001 - report, never crash
            pass
    return type(error).__name__, "%s: %s" % (type(error).__name__, error)


def run(args, report):
    import grpc  # imported here so a missing grpcio is reported as JSON

    report["grpcio_version"] = getattr(grpc, "__version__", "unknown")
    start = time.monotonic()
    deadline = start + args.deadline
    metadata = tuple(args.header)

    def left():
        return max(0.0, deadline - time.monotonic())

    def record_error(error):
        name, text = _status_of(error)
        report["errors"][name] = report["errors"].get(name, 0) + 1
        if report["first_error"] is None:
            report["first_error"] = text

    if args.xds_creds:
        # gRFC A29: security from the cluster's UpstreamTlsContext and the bootstrap's
        # certificate providers; plaintext only where xDS configures none.
        # (insecure credentials as an object are still under grpc.experimental in
        # grpcio 1.85.)
        import grpc.experimental  # noqa: PLC0415 - only needed here

        creds = grpc.xds_channel_credentials(
            fallback_credentials=grpc.experimental.insecure_channel_credentials())
        channel = grpc.secure_channel(args.target, creds)
    else:
        channel = grpc.insecure_channel(args.target)
    try:
        pay = channel.unary_unary(
            PAY_METHOD,
            request_serializer=lambda order: encode_pay_request(*order),
            response_deserializer=decode_pay_reply,
        )
        try:
            grpc.channel_ready_future(channel).result(timeout=left())
            report["ready"] = True
        except grpc.FutureTimeoutError:
            # Not ready in time: one fail-fast call tells why (TRANSIENT_FAILURE carries
            # the resolver's or the xDS client's error; still CONNECTING times out).
            report["attempted"] = 1
            try:
                pay(("probe", 0), timeout=max(0.1, min(PROBE_TIMEOUT_S, left())),
                    metadata=metadata)
                report["ok"] += 1
            except grpc.RpcError as error:
                record_error(error)
                report["first_error"] = "channel not ready after %.1fs; probe call: %s" % (
                    args.deadline, report["first_error"])
            return

        for i in range(args.calls):
            remaining = left()
            if remaining <= 0:
                break
            report["attempted"] += 1
            try:
                reply = pay(("order-%d" % i, 100 + i),
                            timeout=min(PER_CALL_TIMEOUT_S, remaining),
                            metadata=metadata)
            except grpc.RpcError as error:
                record_error(error)
                continue
            report["ok"] += 1
            version = reply["version"]
            report["by_version"][version] = report["by_version"].get(version, 0) + 1
            served_by = reply["served_by"]
            report["by_served_by"][served_by] = report["by_served_by"].get(served_by, 0) + 1
    finally:
        if args.linger > 0 and sys.exc_info()[0] is None:  # not while raising
            report["elapsed_ms"] = int((time.monotonic() - start) * 1000)
            _emit(report)
            time.sleep(args.linger)
        channel.close()
        report["elapsed_ms"] = int((time.monotonic() - start) * 1000)


def _header(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("header must be KEY=VALUE, got %r" % text)
    return key.lower(), value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target", help="e.g. xds:///payment")
    parser.add_argument("calls", type=int, help="number of Pay calls")
    parser.add_argument("--deadline", type=float, default=20.0,
                        help="seconds for everything (ready wait and calls)")
    parser.add_argument("--header", type=_header, action="append", default=[],
                        help="KEY=VALUE metadata sent with every call (repeatable)")
    parser.add_argument("--xds-creds", action="store_true",
                        help="use xDS channel credentials (mTLS as CDS says, gRFC A29)")
    parser.add_argument("--linger", type=float, default=0.0,
                        help="seconds to keep the channel open after printing the report")
    args = parser.parse_args()

    report = {
        "ok": 0,
        "errors": {},
        "by_version": {},
        "by_served_by": {},
        "first_error": None,
        "ready": False,
        "attempted": 0,
        "elapsed_ms": 0,
    }
    if not os.environ.get("GRPC_XDS_BOOTSTRAP") and not os.environ.get(
            "GRPC_XDS_BOOTSTRAP_CONFIG"):
        report["errors"]["NO_BOOTSTRAP"] = 1
        report["first_error"] = "neither GRPC_XDS_BOOTSTRAP nor GRPC_XDS_BOOTSTRAP_CONFIG is set"
    else:
        try:
            run(args, report)
        except Exception as error:  # noqa: BLE001 - the contract is one JSON line
            report["errors"]["SCRIPT_ERROR"] = report["errors"].get("SCRIPT_ERROR", 0) + 1
            if report["first_error"] is None:
                report["first_error"] = "%s: %s" % (type(error).__name__, error)
    _emit(report)
    # Skip interpreter teardown: grpc's background threads must not delay or crash the
    # exit after the report is out.
    os._exit(0)


if __name__ == "__main__":
    main()
