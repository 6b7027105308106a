#!/usr/bin/env node
// An OCO callback program in Node.js, with @grpc/grpc-js and @grpc/proto-loader.
//
// It loads the .proto files that `oco proto --out DIR` writes (never a copy), declares
// its routes in its Listen stream, replies with SendMessages, and keeps a counter in
// the bot's Storage service with compare-and-set. When the bot goes away it reconnects
// with backoff and declares its routes again. See README.md beside it.
//
//   OCO_ADDRESS      host:port of the bot's gRPC API (default 127.0.0.1:50051)
//   OCO_CALLBACK_ID  this callback's id in the bot's configuration
//   OCO_SECRET       this callback's secret (the bot passes it to programs it launches)
//   OCO_PROTO_DIR    where `oco proto --out` wrote the .proto files (default build/proto
//                    beside this file; written by `oco proto` on first start if missing)
//
// Over TLS when any of these is set (the bot sets them for programs it launches when
// its API uses TLS):
//   OCO_TLS_CA           PEM file of the CA that signed the bot's certificate
//                        (default: Node's roots)
//   OCO_TLS_CERT         PEM file of this callback's certificate, and
//   OCO_TLS_KEY          its private key, when the bot requires client certificates
//   OCO_TLS_SERVER_NAME  the name in the bot's certificate, when it is not the host of
//                        OCO_ADDRESS
'use strict';

const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const ADDRESS = process.env.OCO_ADDRESS || '127.0.0.1:50051';
const CALLBACK_ID = process.env.OCO_CALLBACK_ID || '';
const SECRET = process.env.OCO_SECRET || '';
const PROTO_DIR = process.env.OCO_PROTO_DIR || path.join(__dirname, 'build', 'proto');
const TLS = {
  ca: process.env.OCO_TLS_CA || '',
  cert: process.env.OCO_TLS_CERT || '',
  key: process.env.OCO_TLS_KEY || '',
  serverName: process.env.OCO_TLS_SERVER_NAME || '',
};

// Status codes after which reconnecting cannot help: the configuration is wrong.
const FATAL = new Set([grpc.status.UNAUTHENTICATED, grpc.status.PERMISSION_DENIED, grpc.status.INVALID_ARGUMENT]);
const UNARY_DEADLINE_MS = 30_000;
const BACKOFF_MIN_MS = 200;
const BACKOFF_MAX_MS = 10_000;

function log(...args) {
  // stderr: the bot forwards a launched callback's output to its own log.
  console.error(`[node-callback ${CALLBACK_ID}]`, ...args);
}

// ---- the protocol, from `oco proto --out` ------------------------------------------

function ensureProtos(dir) {
  if (fs.existsSync(path.join(dir, 'robot.proto'))) return;
  log(`no .proto files in ${dir}; running \`oco proto --out ${dir}\``);
  try {
    execFileSync('oco', ['proto', '--out', dir], { stdio: ['ignore', 'ignore', 'inherit'] });
  } catch (err) {
    throw new Error(
      `cannot write the .proto files to ${dir} (${err.message}): run \`oco proto --out ${dir}\` ` +
        '(or `npm run proto`) where oco is installed, or point OCO_PROTO_DIR at such a directory',
    );
  }
}

function loadProtocol(dir) {
  ensureProtos(dir);
  const definition = protoLoader.loadSync(['robot.proto', 'storage.proto'], {
    includeDirs: [dir],
    keepCase: true, // the specification spells a field `WithMention`; keep every name as written
    longs: String, // uint64 versions arrive as decimal strings
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).oco;
}

// ---- transport ---------------------------------------------------------------------

function readPem(variable, file) {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new Error(`${variable}: cannot read ${file}: ${err.message}`);
  }
}

// Plaintext, or TLS when any OCO_TLS_* variable is set. Returns the channel credentials,
// the channel options they need, and whether they are TLS.
function transport() {
  if (!TLS.ca && !TLS.cert && !TLS.key && !TLS.serverName) {
    return { credentials: grpc.credentials.createInsecure(), options: {}, secure: false };
  }
  if (Boolean(TLS.cert) !== Boolean(TLS.key)) {
    throw new Error('set both OCO_TLS_CERT and OCO_TLS_KEY, or neither');
  }
  const ca = TLS.ca ? readPem('OCO_TLS_CA', TLS.ca) : null;
  const key = TLS.key ? readPem('OCO_TLS_KEY', TLS.key) : null;
  const cert = TLS.cert ? readPem('OCO_TLS_CERT', TLS.cert) : null;
  const options = {};
  const host = ADDRESS.replace(/:\d+$/, '').replace(/^\[(.*)\]$/, '$1');
  // Only when it differs from the host dialled: grpc-js passes the override on as the
  // TLS server name (SNI), and Node warns (DEP0123) when that is an IP address.
  if (TLS.serverName && TLS.serverName !== host) options['grpc.ssl_target_name_override'] = TLS.serverName;
  return { credentials: grpc.credentials.createSsl(ca, key, cert), options, secure: true };
}

// ---- calls -------------------------------------------------------------------------

function metadata() {
  // Every call carries the secret; the bot maps it to this callback's id.
  const md = new grpc.Metadata();
  md.set('authorization', `Bearer ${SECRET}`);
  return md;
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + UNARY_DEADLINE_MS);
    client[method](request, metadata(), { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- what this callback does -------------------------------------------------------

const ROUTES = [
  { id: 'ping', pattern: '^ping$', respond: true, ignore_case: true, help: 'ping - replies PONG (from Node.js)' },
  {
    id: 'count',
    pattern: '^count(?: (?P<step>\\d{1,6}))?$',
    respond: true,
    help: 'count [n] - adds n (default 1) to a counter kept in the bot, from Node.js',
  },
  {
    id: 'hello',
    pattern: '\\bhello,? node(?:js)?\\b',
    respond: false,
    ignore_case: true,
    help: 'hello node - Node.js says hello to whoever says it, addressed to the bot or not',
  },
];

class NodeCallback {
  constructor(oco) {
    const { credentials, options: tlsOptions, secure } = transport();
    this.over = secure ? ' over TLS' : '';
    const options = {
      // Reconnect quickly when the bot restarts (the default waits up to two minutes).
      'grpc.initial_reconnect_backoff_ms': BACKOFF_MIN_MS,
      'grpc.max_reconnect_backoff_ms': 5000,
      'grpc.keepalive_time_ms': 30_000,
      'grpc.keepalive_timeout_ms': 10_000,
      ...tlsOptions,
    };
    this.robot = new oco.Robot(ADDRESS, credentials, options);
    this.storage = new oco.Storage(ADDRESS, credentials, options);
    this.listening = null;
    this.stopped = false;
  }

  // Reply where the match came from: its room, or privately to its user.
  async reply(matched, body, withMention = false) {
    const source = matched.message.source;
    const hasRoom = source.room && source.room.id && !matched.message.private;
    await unary(this.robot, 'SendMessages', {
      WithMention: withMention && Boolean(hasRoom),
      messages: [
        {
          body,
          source: { user: source.user, room: hasRoom ? source.room : null },
          in_reply_to: matched.message.id,
          private: !hasRoom,
        },
      ],
    });
  }

  // Add `step` to the counter with compare-and-set: read the value and its version,
  // write only if the version is still the same, and on ABORTED read again.
  async addToCounter(step) {
    for (let attempt = 0; attempt < 100; attempt += 1) {
      const current = await unary(this.storage, 'Get', { key: 'count' });
      const value = (current.found ? Number(current.value.toString('utf8')) || 0 : 0) + step;
      const request = {
        key: 'count',
        value: Buffer.from(String(value)),
        // 0 means "only if the key does not exist yet".
        expected_version: current.found ? current.version : '0',
      };
      try {
        await unary(this.storage, 'Set', request);
        return value;
      } catch (err) {
        if (err.code !== grpc.status.ABORTED) throw err;
        await sleep(Math.random() * 20);
      }
    }
    throw new Error('gave up after 100 conflicting updates of the counter');
  }

  async handle(event) {
    if (event.type !== 'matched_message') return;
    const matched = event.matched_message;
    const user = matched.message.source.user;
    switch (matched.route_id) {
      case 'ping':
        await this.reply(matched, 'PONG from Node.js');
        break;
      case 'count': {
        const step = Number(matched.named_groups.step || '1');
        const value = await this.addToCounter(step);
        await this.reply(matched, `node counter is ${value}`, true);
        break;
      }
      case 'hello':
        await this.reply(matched, `hello ${user.name || user.id}, from Node.js ${process.version}`);
        break;
      default:
        log(`no handler for route ${matched.route_id}`);
    }
  }

  // One Listen stream: resolves when it ends, with the status that ended it.
  listenOnce(onRegistered) {
    return new Promise((resolve) => {
      const call = this.robot.Listen({ plugin_id: CALLBACK_ID, routes: ROUTES }, metadata());
      this.listening = call;
      let settled = false;
      const finish = (status) => {
        if (!settled) {
          settled = true;
          this.listening = null;
          resolve(status);
        }
      };
      // The bot sends the response headers once the routes are registered: from
      // then on no message that matches them can be missed.
      call.on('metadata', (headers) => {
        const count = headers.get('oco-routes')[0];
        onRegistered(count === undefined ? ROUTES.length : Number(count));
      });
      call.on('data', (event) => {
        this.handle(event).catch((err) => log(`handling ${event.matched_message?.route_id}: ${err.message}`));
      });
      call.on('error', (err) => finish({ code: err.code, details: err.details || err.message }));
      call.on('status', (status) => finish(status));
      call.on('end', () => finish({ code: grpc.status.OK, details: 'the bot ended the stream' }));
    });
  }

  async run() {
    let backoff = BACKOFF_MIN_MS;
    while (!this.stopped) {
      const status = await this.listenOnce((routes) => {
        backoff = BACKOFF_MIN_MS;
        log(`connected to ${ADDRESS}${this.over}: ${routes} route(s) registered`);
      });
      if (this.stopped) break;
      if (FATAL.has(status.code)) {
        throw new Error(`the bot refused this callback (${grpc.status[status.code]}): ${status.details}`);
      }
      const delay = backoff * (0.5 + Math.random());
      log(`Listen stream ended (${grpc.status[status.code]}: ${status.details}); reconnecting in ${Math.round(delay)} ms`);
      await sleep(delay);
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    }
  }

  stop() {
    this.stopped = true;
    if (this.listening) this.listening.cancel();
    this.robot.close();
    this.storage.close();
  }
}

async function main() {
  if (!SECRET) throw new Error('no secret: set OCO_SECRET (the bot passes it to callbacks it launches)');
  if (!CALLBACK_ID) throw new Error('no callback id: set OCO_CALLBACK_ID');
  const callback = new NodeCallback(loadProtocol(PROTO_DIR));
  for (const signal of ['SIGINT', 'SIGTERM']) {
    process.on(signal, () => {
      log(`received ${signal}; stopping`);
      callback.stop();
    });
  }
  await callback.run();
}

main().then(
  () => process.exit(0),
  (err) => {
    log(err.message);
    process.exit(1);
  },
);
