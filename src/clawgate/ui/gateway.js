// The gateway's WebSocket protocol, as any client speaks it: connect.challenge, then `connect`
// with the token and scopes, then requests by id and events. Nothing here polls.

const ALL_SCOPES = ["operator.read", "operator.write", "operator.admin"];
const PROTOCOL = { minProtocol: 3, maxProtocol: 4 };

export class GatewayError extends Error {
  constructor(error) {
    super(error.message || error.code || "gateway error");
    this.code = error.code;
    this.details = error.details;
  }
}

function socketUrl() {
  // The page's own host and port: the gateway accepts a browser's WebSocket only from its own origin.
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/`;
}

export class Gateway {
  constructor({ token, onEvent = () => {}, onState = () => {}, subscribe = null, reconnect = true }) {
    this.token = token;
    this.onEvent = onEvent;
    this.onState = onState;
    this.subscribe = subscribe; // params of events.subscribe sent after every (re)connect
    this.reconnect = reconnect;
    this.scopes = null;
    this.pending = new Map();
    this.nextId = 1;
    this.ws = null;
    this.closed = false;
    this.retryMs = 500;
  }

  // Resolves with the granted scopes, or rejects with the gateway's own error.
  start() {
    return this._open(ALL_SCOPES);
  }

  _open(scopes) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(socketUrl());
      this.ws = ws;
      let settled = false;
      let connected = false; // this socket completed the handshake
      const fail = (err) => { if (!settled) { settled = true; reject(err); } };
      ws.onmessage = (msg) => {
        let frame;
        try { frame = JSON.parse(msg.data); } catch { return; }
        if (frame.type === "event" && frame.event === "connect.challenge") {
          ws.send(JSON.stringify({
            type: "req", id: "connect", method: "connect",
            params: { ...PROTOCOL, role: "operator", scopes,
              client: { id: "clawgate-dashboard", version: "1", platform: "web", mode: "ui" },
              auth: { token: this.token || undefined } },
          }));
        } else if (frame.type === "res" && frame.id === "connect") {
          if (frame.ok) {
            settled = true;
            connected = true;
            this.scopes = frame.payload?.auth?.scopes || scopes;
            this.retryMs = 500;
            this.onState("connected");
            if (this.subscribe) this.request("events.subscribe", this.subscribe).catch(() => {});
            resolve(this.scopes);
          } else if (frame.error?.details?.code === "MISSING_SCOPE" && scopes.length > 1) {
            // The token's ceiling is lower: ask again with one scope fewer.
            settled = true;
            ws.onclose = null;
            ws.close();
            this._open(scopes.slice(0, -1)).then(resolve, reject);
          } else {
            fail(new GatewayError(frame.error || {}));
          }
        } else if (frame.type === "res") {
          const waiter = this.pending.get(frame.id);
          if (!waiter) return;
          this.pending.delete(frame.id);
          if (frame.ok) waiter.resolve(frame.payload);
          else waiter.reject(new GatewayError(frame.error || {}));
        } else if (frame.type === "event") {
          this.onEvent(frame.event, frame.payload || {});
        }
      };
      ws.onclose = (ev) => {
        for (const waiter of this.pending.values()) waiter.reject(new GatewayError({ code: "UNAVAILABLE", message: "connection closed" }));
        this.pending.clear();
        if (!connected) {
          fail(new GatewayError({ code: "UNAVAILABLE", message: ev.reason || `connection closed (${ev.code})` }));
          return;
        }
        if (this.closed || !this.reconnect) return;
        // Reconnect by itself, e.g. after a gateway restart, with a growing pause.
        this.onState("reconnecting");
        setTimeout(() => this._retry(scopes), this.retryMs);
        this.retryMs = Math.min(this.retryMs * 2, 5000);
      };
    });
  }

  _retry(scopes) {
    if (this.closed) return;
    this._open(scopes).catch((err) => {
      if (err.code === "UNAUTHORIZED") { this.onState("unauthorized", err); return; }
      this.onState("reconnecting");
      setTimeout(() => this._retry(scopes), this.retryMs);
      this.retryMs = Math.min(this.retryMs * 2, 5000);
    });
  }

  request(method, params = {}) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(new GatewayError({ code: "UNAVAILABLE", message: "not connected" }));
    }
    const id = `r${this.nextId++}`;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ type: "req", id, method, params }));
    });
  }

  hasScope(scope) {
    return (this.scopes || []).includes(scope);
  }

  close() {
    this.closed = true;
    if (this.ws) this.ws.close();
  }
}
