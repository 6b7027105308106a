#!/usr/bin/env node
// An OCO callback program in Node.js, with @grpc/grpc-js and @grpc/proto-loader.
//
// It loads the .proto files that `oco proto --out DIR` writes (never a copy), declares
// its routes in its Listen stream, replies with SendMessages, keeps a counter in the
// bot's Storage service with compare-and-set, and keeps notes in a PostgreSQL schema of
// its own when the bot offers the `postgresql` data store (GetDataStore, then the `pg`
// client). It serves two webhooks on the bot's HTTP server (when the bot has one):
// POST /hooks/<id>/hello answers JSON at once; POST /hooks/<id>/count is asynchronous,
// kept by the bot until this program acknowledges it (Robot.Acknowledge) after adding
// to the counter. `oco greet` asks the person a question (Message.question) and answers
// once their reply comes as Event.answer. When the bot goes away it reconnects with backoff and declares its
// routes again. See README.md beside it.
//
//   OCO_ADDRESS      host:port of the bot's gRPC API (default 127.0.0.1:50051); several,
//                    comma-separated, for bots that run as one active and standbys (ha:):
//                    one Listen stream to each (events come from the active bot only),
//                    replies on the bot the event came from, and a send a standby refuses
//                    goes to the bot it names
//   OCO_CALLBACK_ID  this callback's id in the bot's configuration
//   OCO_SECRET       this callback's secret (the bot passes it to programs it launches)
//   OCO_PROTO_DIR    where `oco proto --out` wrote the .proto files (default build/proto
//                    beside this file; written by `oco proto` on first start if missing)
//   OCO_REQUIRES     data-store types to declare as required, comma-separated (e.g.
//                    `postgresql`): the bot then refuses this callback unless it offers
//                    them. Unset, the notes routes answer that PostgreSQL is missing.
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
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const pg = require('pg');

const ADDRESSES = (process.env.OCO_ADDRESS || '127.0.0.1:50051')
  .split(',')
  .map((address) => address.trim())
  .filter(Boolean);
const CALLBACK_ID = process.env.OCO_CALLBACK_ID || '';
const SECRET = process.env.OCO_SECRET || '';
const PROTO_DIR = process.env.OCO_PROTO_DIR || path.join(__dirname, 'build', 'proto');
const REQUIRES = (process.env.OCO_REQUIRES || '')
  .split(',')
  .map((type) => type.trim())
  .filter(Boolean);
const TLS = {
  ca: process.env.OCO_TLS_CA || '',
  cert: process.env.OCO_TLS_CERT || '',
  key: process.env.OCO_TLS_KEY || '',
  serverName: process.env.OCO_TLS_SERVER_NAME || '',
};

// Status codes after which reconnecting cannot help: the configuration is wrong (a
// required data store the bot does not offer is FAILED_PRECONDITION).
const FATAL = new Set([
  grpc.status.UNAUTHENTICATED,
  grpc.status.PERMISSION_DENIED,
  grpc.status.INVALID_ARGUMENT,
  grpc.status.FAILED_PRECONDITION,
]);
const UNARY_DEADLINE_MS = 30_000;
const BACKOFF_MIN_MS = 200;
const BACKOFF_MAX_MS = 10_000;

// Questions asked (Message.question) and waiting for their Event.answer, by id. Shared
// by the connections to every bot (ha:): the answer comes from the active one.
const QUESTIONS = new Map();

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
  const definition = protoLoader.loadSync(['robot.proto', 'storage.proto', 'datastores.proto'], {
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
function transport(address) {
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
  const host = address.replace(/:\d+$/, '').replace(/^\[(.*)\]$/, '$1');
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

// The typed error a failed call names in its trailing metadata (`oco-error-type` and
// `oco-error-<attribute>`, percent-encoded), or '' for a status without one.
function errorMetadata(err, key) {
  const values = err && err.metadata ? err.metadata.get(key) : [];
  return values.length ? decodeURIComponent(String(values[0])) : '';
}

// ---- notes, in a PostgreSQL schema of this callback's own ---------------------------

// PostgreSQL refusing the credentials: 28P01 a wrong password (rotated), 28000 a role
// that may not log in (revoked). Asking the bot again gets the current ones.
const PG_AUTH_FAILED = new Set(['28P01', '28000']);
// The server ended the session (a rotation ends the old password's sessions): the pool
// drops that client, and the next attempt connects anew.
const PG_SESSION_ENDED = new Set(['57P01', '57P02', '57P03']);

class Notes {
  constructor(datastores) {
    this.datastores = datastores;
    this.pool = null; // a pg.Pool on the URL of the access below
    this.access = null; // the last DataStoreAccess the bot answered
  }

  // GetDataStore("postgresql"): the URL (with this callback's own role and password) and
  // the schema it owns. Provisioned by the bot on first use; the same every time until
  // the operator rotates or revokes it. `refresh` after PostgreSQL refused the last
  // ones: the bot then makes sure the database holds the credentials it answers.
  async connect(refresh = false) {
    const access = await unary(this.datastores, 'GetDataStore', { type: 'postgresql', refresh });
    await this.close();
    this.access = access;
    this.pool = new pg.Pool({ connectionString: access.url, max: 2, connectionTimeoutMillis: 10_000 });
    // An idle session the server ends (a rotation) is reported here; the next query
    // connects again. Without a listener, Node would exit on it.
    this.pool.on('error', (err) => log(`PostgreSQL session ended: ${err.message}`));
    log(`PostgreSQL: schema ${access.namespace}, credentials generation ${access.generation}`);
    await this.pool.query(
      `CREATE TABLE IF NOT EXISTS ${this.table()} (
         id serial PRIMARY KEY, author text NOT NULL, body text NOT NULL, created timestamptz NOT NULL DEFAULT now())`,
    );
  }

  // The table, qualified with the schema the bot named (the role's search_path is that
  // schema too, so an unqualified name would land there as well).
  table() {
    const schema = this.access.namespace;
    return schema ? `${pg.escapeIdentifier(schema)}.notes` : 'notes';
  }

  async query(text, values) {
    let refresh = false;
    for (let attempt = 1; ; attempt += 1) {
      try {
        if (!this.pool) await this.connect(refresh);
        return await this.pool.query(text.replace('$TABLE', () => this.table()), values);
      } catch (err) {
        if (attempt >= 3) throw err;
        if (PG_AUTH_FAILED.has(err.code)) {
          log(`PostgreSQL refused the credentials (${err.code}: ${err.message}); asking the bot again`);
          await this.close();
          refresh = true;
        } else if (!(PG_SESSION_ENDED.has(err.code) || /Connection terminated/i.test(err.message))) {
          throw err;
        }
      }
    }
  }

  async add(author, body) {
    const result = await this.query('INSERT INTO $TABLE (author, body) VALUES ($1, $2) RETURNING id', [author, body]);
    return result.rows[0].id;
  }

  async list(limit = 10) {
    const result = await this.query('SELECT id, author, body FROM $TABLE ORDER BY id DESC LIMIT $1', [limit]);
    return result.rows.reverse();
  }

  async close() {
    const pool = this.pool;
    this.pool = null;
    if (pool) await pool.end().catch((err) => log(`closing the PostgreSQL pool: ${err.message}`));
  }
}

// What to tell the person when the notes cannot be reached; rethrows anything else.
function notesUnavailable(err) {
  if (err.code === grpc.status.FAILED_PRECONDITION && errorMetadata(err, 'oco-error-type') === 'DataStoreUnavailableError') {
    return 'notes need PostgreSQL, and this bot offers no postgresql data store (its operator adds one under datastores:)';
  }
  if (err.code === grpc.status.PERMISSION_DENIED && errorMetadata(err, 'oco-error-capability') === 'datastores') {
    return "notes need PostgreSQL, and this callback's capabilities do not include datastores";
  }
  if (err.code === grpc.status.UNAVAILABLE) return `PostgreSQL is unavailable right now (${err.details}); try again later`;
  throw err;
}

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
    id: 'note',
    pattern: '^note (?P<text>.+)$',
    respond: true,
    help: 'note <text> - keeps a note in PostgreSQL (when the bot offers it), from Node.js',
  },
  { id: 'notes', pattern: '^notes$', respond: true, help: 'notes - the last 10 notes, from Node.js' },
  { id: 'greet', pattern: '^greet$', respond: true, help: 'greet - asks your name, then greets you, from Node.js' },
  {
    id: 'hello',
    pattern: '\\bhello,? node(?:js)?\\b',
    respond: false,
    ignore_case: true,
    help: 'hello node - Node.js says hello to whoever says it, addressed to the bot or not',
  },
];

// Served at /hooks/<callback id><path> on the bot's HTTP server (`http:` in its config).
const WEBHOOKS = [
  { id: 'hello', method: 'POST', path: '/hello', help: 'POST {"name": ...} - a JSON greeting from Node.js' },
  {
    id: 'count',
    method: 'POST',
    path: '/count',
    // Answered 202 by the bot at once, and kept until acknowledged: a request that comes
    // while this program restarts is not lost, and one it was handling when it died
    // comes again.
    asynchronous: true,
    help: 'POST <n> - adds n to the counter, later',
  },
];

class NodeCallback {
  constructor(oco, address) {
    this.address = address;
    this.bots = [this]; // every bot's NodeCallback (ha:), set by main()
    const { credentials, options: tlsOptions, secure } = transport(address);
    this.over = secure ? ' over TLS' : '';
    const options = {
      // Reconnect quickly when the bot restarts (the default waits up to two minutes).
      'grpc.initial_reconnect_backoff_ms': BACKOFF_MIN_MS,
      'grpc.max_reconnect_backoff_ms': 5000,
      'grpc.keepalive_time_ms': 30_000,
      'grpc.keepalive_timeout_ms': 10_000,
      ...tlsOptions,
    };
    this.robot = new oco.Robot(address, credentials, options);
    this.storage = new oco.Storage(address, credentials, options);
    this.datastores = new oco.DataStores(address, credentials, options);
    this.notes = new Notes(this.datastores);
    this.listening = null;
    this.stopped = false;
    this.acks = []; // delivery ids of events handled, not yet acknowledged
  }

  // Acknowledge a handled durable event. Ids handled in the same turn of the event loop
  // go in one call; a lone one goes at once (on the next turn).
  acknowledge(deliveryId) {
    this.acks.push(deliveryId);
    if (this.acks.length > 1) return; // a flush is already scheduled
    setImmediate(() => {
      const ids = this.acks;
      this.acks = [];
      unary(this.robot, 'Acknowledge', { delivery_ids: ids }).catch((err) =>
        // Not fatal: the bot delivers them again (at least once).
        log(`could not acknowledge ${ids.length} event(s) (${err.details || err.message}); they will come again`),
      );
    });
  }

  // A request to one of WEBHOOKS. A synchronous one is answered with RespondWebhook.
  async handleWebhook(request) {
    const body = request.body.toString('utf8');
    switch (request.route_id) {
      case 'hello': {
        let name;
        try {
          name = body ? JSON.parse(body).name : undefined;
        } catch (err) {
          return { status: 400, headers: { 'content-type': 'text/plain' }, body: `not JSON: ${err.message}\n` };
        }
        const greeting = { greeting: `hello ${name || 'stranger'}, from Node.js ${process.version}` };
        return { status: 200, headers: { 'content-type': 'application/json' }, body: JSON.stringify(greeting) };
      }
      case 'count': {
        const step = Number.parseInt(body, 10) || 1;
        const value = await this.addToCounter(step);
        log(`webhook count: added ${step}, counter is ${value}${request.redelivered ? ' (delivered again)' : ''}`);
        return null; // asynchronous: the caller had its 202
      }
      default:
        return { status: 404, headers: {}, body: 'no such webhook here\n' };
    }
  }

  async respondWebhook(request) {
    let response;
    try {
      response = await this.handleWebhook(request);
    } catch (err) {
      log(`webhook ${request.route_id} failed: ${err.stack || err.message}`);
      response = { status: 500, headers: {}, body: 'the callback failed to handle this request\n' };
    }
    if (request.asynchronous) return;
    const { status, headers, body } = response || { status: 204, headers: {}, body: '' };
    await unary(this.robot, 'RespondWebhook', { request_id: request.id, status, headers, body: Buffer.from(body) });
  }

  async dispatch(event) {
    try {
      if (event.type === 'webhook_request') await this.respondWebhook(event.webhook_request);
      else await this.handle(event);
    } finally {
      // A durable event is acknowledged once handled, even when the handler failed
      // (else it would come back forever); one this program dies handling comes again.
      if (event.delivery_id) this.acknowledge(event.delivery_id);
    }
  }

  // A call to the bot this stream is on; when it is a standby (ha:) it refuses with
  // UNAVAILABLE and `oco-error-type: StandbyError`, naming the active bot in
  // `oco-error-active-address` (empty while a takeover is under way): call there.
  async toActive(method, request) {
    let bot = this;
    for (let attempt = 1; ; attempt++) {
      try {
        return await unary(bot.robot, method, request);
      } catch (err) {
        if (errorMetadata(err, 'oco-error-type') !== 'StandbyError' || this.bots.length < 2 || attempt >= 40) throw err;
        const active = errorMetadata(err, 'oco-error-active-address');
        const named = this.bots.find((other) => other !== bot && other.address === active);
        if (!named) await sleep(250);
        bot = named || this.bots[(this.bots.indexOf(bot) + 1) % this.bots.length];
      }
    }
  }

  // Reply where the match came from: its room, or privately to its user.
  async reply(matched, body, withMention = false) {
    const source = matched.message.source;
    const hasRoom = source.room && source.room.id && !matched.message.private;
    await this.toActive('SendMessages', {
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

  // Ask the person who wrote `matched` a question where they wrote it: their next message
  // there is the answer, which no route sees. Resolves with the QuestionAnswer: status
  // STATUS_ANSWERED (with its message), STATUS_TIMED_OUT or STATUS_CANCELLED. With
  // `choices`, the bot itself asks again until the answer is one of them.
  async ask(matched, body, { timeoutSeconds = 60, choices = [] } = {}) {
    const id = crypto.randomUUID(); // ours to choose; the answer names it
    const answered = new Promise((resolve) => QUESTIONS.set(id, resolve));
    const source = matched.message.source;
    const hasRoom = source.room && source.room.id && !matched.message.private;
    try {
      await this.toActive('SendMessages', {
        WithMention: Boolean(hasRoom),
        messages: [
          {
            body,
            source: { user: source.user, room: hasRoom ? source.room : null },
            in_reply_to: matched.message.id,
            private: !hasRoom,
            question: { id, timeout_seconds: timeoutSeconds, choices },
          },
        ],
      });
      return await answered; // the bot always ends a question: answered, timed out or cancelled
    } finally {
      QUESTIONS.delete(id);
    }
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
    if (event.type === 'answer') {
      // Replicas of this callback get every answer: only the one that asked knows the id.
      const waiting = QUESTIONS.get(event.answer.question_id);
      if (waiting) waiting(event.answer);
      return;
    }
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
      case 'note': {
        let answer;
        try {
          const id = await this.notes.add(user.id, matched.named_groups.text);
          answer = `noted (#${id})`;
        } catch (err) {
          answer = notesUnavailable(err);
        }
        await this.reply(matched, answer, true);
        break;
      }
      case 'notes': {
        let answer;
        try {
          const notes = await this.notes.list();
          answer = notes.length ? notes.map((n) => `#${n.id} ${n.body} (${n.author})`).join('\n') : 'no notes yet';
        } catch (err) {
          answer = notesUnavailable(err);
        }
        await this.reply(matched, answer);
        break;
      }
      case 'greet': {
        const answer = await this.ask(matched, 'What is your name?', { timeoutSeconds: 60 });
        if (answer.status === 'STATUS_ANSWERED') {
          await this.reply(matched, `nice to meet you, ${answer.message.body.trim()}, from Node.js`);
        } else {
          await this.reply(matched, `no answer (${answer.status})`, true);
        }
        break;
      }
      default:
        log(`no handler for route ${matched.route_id}`);
    }
  }

  // One Listen stream: resolves when it ends, with the status that ended it.
  listenOnce(onRegistered) {
    return new Promise((resolve) => {
      const request = {
        plugin_id: CALLBACK_ID,
        routes: ROUTES,
        requires: REQUIRES,
        webhooks: WEBHOOKS,
        acknowledge: true, // durable events carry a delivery_id to acknowledge
      };
      const call = this.robot.Listen(request, metadata());
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
        this.dispatch(event).catch((err) => log(`handling ${event.type}: ${err.message}`));
      });
      call.on('error', (err) => finish({ code: err.code, details: err.details || err.message, error: err }));
      call.on('status', (status) => finish(status));
      call.on('end', () => finish({ code: grpc.status.OK, details: 'the bot ended the stream' }));
    });
  }

  async run() {
    let backoff = BACKOFF_MIN_MS;
    while (!this.stopped) {
      const status = await this.listenOnce((routes) => {
        backoff = BACKOFF_MIN_MS;
        log(`connected to ${this.address}${this.over}: ${routes} route(s) registered, ${WEBHOOKS.length} webhook(s)`);
      });
      if (this.stopped) break;
      if (FATAL.has(status.code)) {
        const datastore = errorMetadata(status.error, 'oco-error-datastore');
        const why = datastore ? ` a data store this callback requires (OCO_REQUIRES), ${datastore}:` : '';
        throw new Error(`the bot refused this callback (${grpc.status[status.code]}):${why} ${status.details}`);
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
    this.datastores.close();
    this.notes.close();
  }
}

async function main() {
  if (!SECRET) throw new Error('no secret: set OCO_SECRET (the bot passes it to callbacks it launches)');
  if (!CALLBACK_ID) throw new Error('no callback id: set OCO_CALLBACK_ID');
  const oco = loadProtocol(PROTO_DIR);
  const callbacks = ADDRESSES.map((address) => new NodeCallback(oco, address));
  for (const callback of callbacks) callback.bots = callbacks;
  for (const signal of ['SIGINT', 'SIGTERM']) {
    process.on(signal, () => {
      log(`received ${signal}; stopping`);
      for (const callback of callbacks) callback.stop();
    });
  }
  await Promise.all(callbacks.map((callback) => callback.run()));
}

main().then(
  () => process.exit(0),
  (err) => {
    log(err.message);
    process.exit(1);
  },
);
