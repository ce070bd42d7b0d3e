#!/usr/bin/env node
// nodeworker: a plain baton worker in Node, standard library only, the way
// a Node user runs under baton: `server.listen({fd: 3})`, readiness by
// `--ready after:DURATION` (Node cannot send a Unix datagram to
// NOTIFY_SOCKET without a native module), drain on SIGTERM.
//
//     GET /            {"generation": G, "worker": W, "workers": N, "pid": P}
//     GET /slow?ms=N   the same, after N milliseconds
//     anything else    404 {"error": "not found"}
//
// G is $BATON_GENERATION, W and N are $BATON_WORKER and $BATON_WORKERS (0
// and 1 when unset).
//
// The drain loses nothing, which stock Node does not promise: since Node 19
// `server.close()` also closes "idle" connections, and a connection that was
// accepted a moment ago and whose first request is still on its way counts
// as idle, so its client sees the connection closed without a response.
// Here the drain stops accepting, answers every request that arrives with
// `Connection: close`, gives an idle keep-alive connection that has served
// a request IDLE_GRACE_MS for one more, waits up to FIRST_REQUEST_GRACE_MS
// for the first request of a fresh one, and exits once every connection is
// closed.
'use strict';

const http = require('http');

const IDLE_GRACE_MS = 200;
const FIRST_REQUEST_GRACE_MS = 5000;

const identity = {
  generation: Number(process.env.BATON_GENERATION || 0),
  worker: Number(process.env.BATON_WORKER || 0),
  workers: Number(process.env.BATON_WORKERS || 1),
  pid: process.pid,
};

let draining = false;
// Every open connection, with how many requests it has served and whether
// a request is in progress.
const connections = new Map();

function closeIfIdle(socket) {
  const state = connections.get(socket);
  if (state && !state.busy) {
    socket.end();
  }
}

const server = http.createServer((req, res) => {
  const state = connections.get(req.socket);
  state.busy = true;
  res.on('finish', () => {
    state.busy = false;
    state.served += 1;
    if (draining) {
      closeIfIdle(req.socket);
    }
  });
  if (draining) {
    res.setHeader('Connection', 'close');
  }
  const url = new URL(req.url, 'http://worker');
  const answer = (status, body) => {
    res.writeHead(status, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  if (url.pathname === '/') {
    answer(200, identity);
  } else if (url.pathname === '/slow') {
    setTimeout(() => answer(200, identity), Number(url.searchParams.get('ms') || 0));
  } else {
    answer(404, { error: 'not found' });
  }
});
server.keepAliveTimeout = 60000;
// The drain decides which connections close, not server.close().
server.closeIdleConnections = () => {};

server.on('connection', (socket) => {
  connections.set(socket, { served: 0, busy: false });
  socket.on('close', () => {
    connections.delete(socket);
    if (draining && connections.size === 0) {
      process.exit(0);
    }
  });
  if (draining) {
    // Accepted from the queue during the drain: its request is on its way.
    setTimeout(() => closeIfIdle(socket), FIRST_REQUEST_GRACE_MS);
  }
});

process.on('SIGTERM', () => {
  if (draining) {
    return;
  }
  draining = true;
  server.close();
  if (connections.size === 0) {
    process.exit(0);
  }
  for (const [socket, state] of connections) {
    const grace = state.served > 0 ? IDLE_GRACE_MS : FIRST_REQUEST_GRACE_MS;
    setTimeout(() => closeIfIdle(socket), grace);
  }
});

server.listen({ fd: 3 });
