'use strict';
// A Node.js instance of sprout: started by the instance host before its `load` (a
// stem cell's spare is this process, booted), it loads one function and runs its
// invocations, one at a time, on the link to the host (descriptor 3; see link.js).
//
// host -> node: load {function, code_dir, handler: {module, function}, namespace,
//               version, memory_mb, timeout_ms, deps?}
//               invoke {activation_id, depth, raw, remaining_ms, env?} + event
//               call_returned/call_raised/call_failed/call_refused {id, ...} (sprout.js)
// node -> host: ready, loaded, load_failed {error}, returned {raw} + result,
//               raised {error}, call {id, function, raw?, async?} + event (sprout.js)

const fs = require('fs');
const path = require('path');
const vm = require('vm');
const Module = require('module');

const theLink = require('./link.js');

// `sprout` and `@m6s/box` are sprout's own files, even beside a bundled node_modules.
const OWN = new Map([
  ['sprout', path.join(__dirname, 'sprout.js')],
  ['@m6s/box', path.join(__dirname, 'box.js')],
]);
const resolveFilename = Module._resolveFilename;
Module._resolveFilename = function (request, ...rest) {
  const own = OWN.get(request);
  return own !== undefined ? own : resolveFilename.call(this, request, ...rest);
};

const link = theLink();
let handler = null; // {fn, self, about}
let running = null; // the invocation running now: {deadline}

// A function's error as the protocol carries it: {type, message, traceback}, within
// the bounds of `bounded`.
function describe(e) {
  if (e instanceof Error || (e && typeof e === 'object' && typeof e.message === 'string')) {
    const type = typeof e.name === 'string' && e.name ? e.name : (e.constructor && e.constructor.name) || 'Error';
    return bounded(type, String(e.message), typeof e.stack === 'string' ? ownStack(e.stack) : '');
  }
  // A thrown value that is not an Error: type "Error", its text as the message.
  let message;
  try {
    message = typeof e === 'object' && e !== null ? JSON.stringify(e) : String(e);
  } catch (_) {
    message = String(e);
  }
  return bounded('Error', message === undefined ? String(e) : message, '');
}

const MAX_TYPE = 256; // characters
const MAX_MESSAGE = 16 << 10; // characters
const MAX_ERROR = 64 << 10; // bytes, as JSON
const CUT = '... (truncated)';

// An error object whose JSON fits in 64 KiB (as the Python runtime's): well-formed
// text (a lone surrogate would not be JSON the host reads), the type and the message
// cut first, then the traceback's oldest lines (the end of a JavaScript stack).
function bounded(type, message, traceback) {
  const cut = (s, n) => (s.length > n ? s.slice(0, n) + CUT : s);
  const error = {
    type: cut(type.toWellFormed(), MAX_TYPE),
    message: cut(message.toWellFormed(), MAX_MESSAGE),
    traceback: traceback.toWellFormed(),
  };
  // The traceback's first lines that fit what the type and message leave, in one pass
  // (each line costs its JSON text and the escaped newline before the next).
  const budget = MAX_ERROR - Buffer.byteLength(JSON.stringify({ ...error, traceback: '' })) - 64;
  if (Buffer.byteLength(JSON.stringify(error.traceback)) > budget + 2) {
    const kept = [];
    let used = 0;
    for (const line of error.traceback.split('\n')) {
      const cost = Buffer.byteLength(JSON.stringify(line)) - 2 + 2;
      if (used + cost > budget - CUT.length) break;
      kept.push(line);
      used += cost;
    }
    kept.push(CUT);
    error.traceback = kept.join('\n');
  }
  // What is still over (a single line longer than the budget, a message of escapes).
  while (Buffer.byteLength(JSON.stringify(error)) > MAX_ERROR) {
    const lines = error.traceback.split('\n');
    if (lines.length > 2) {
      lines.splice(-2, 2, CUT);
      error.traceback = lines.join('\n');
    } else if (error.traceback.length > 4 * CUT.length) {
      error.traceback = cut(error.traceback, Math.floor(error.traceback.length / 2));
    } else if (error.traceback !== '') {
      error.traceback = '';
    } else {
      error.message = cut(error.message, Math.floor(error.message.length / 2));
    }
  }
  return error;
}

// A stack without the runtime's frames (and Node's own below them): the function's.
function ownStack(stack) {
  const lines = stack.split('\n');
  let end = lines.findIndex((l) => l.includes(`${__dirname}/`));
  if (end < 0) return stack;
  while (end > 1 && /\(node:|at node:/.test(lines[end - 1])) end -= 1;
  return lines.slice(0, end).join('\n');
}

// The runtime's own verdict on a function (no stack: it is not the function's).
function failure(type, message) {
  const error = new Error(message);
  error.name = type;
  error.stack = '';
  return error;
}

// Compiles `file` as a CommonJS module, with a trailing lookup of a top-level
// `function main` (OpenWhisk's plain code): returns [module, that main or undefined].
function compileEntry(file) {
  const mod = new Module(file, null);
  mod.filename = file;
  mod.paths = Module._nodeModulePaths(path.dirname(file));
  Module._cache[file] = mod;
  let source = fs.readFileSync(file, 'utf8');
  if (source.charCodeAt(0) === 0xfeff) source = source.slice(1);
  if (source.startsWith('#!')) source = '//' + source.slice(2);
  const body = `${source}\n;return typeof main === 'function' ? main : undefined;`;
  let fn;
  try {
    fn = vm.compileFunction(body, ['exports', 'require', 'module', '__filename', '__dirname'], {
      filename: file,
    });
  } catch (e) {
    delete Module._cache[file];
    // The trailing lookup may show in the error: compile the file alone for the
    // function's own (only on this error path).
    vm.compileFunction(source, [], { filename: file });
    throw e;
  }
  const require = Module.createRequire(file);
  let globalMain;
  try {
    globalMain = fn.call(mod.exports, mod.exports, require, mod, file, path.dirname(file));
  } catch (e) {
    delete Module._cache[file];
    throw e;
  }
  mod.loaded = true;
  return [mod, globalMain];
}

// The entry file of module `name` under `dir`: "" is the directory itself
// (package.json `main`, index.js, main.js).
function entryFile(dir, name) {
  const req = Module.createRequire(path.join(dir, 'sprout-entry'));
  if (name === '') {
    try {
      return req.resolve(dir);
    } catch (e) {
      const main = path.join(dir, 'main.js');
      if (fs.existsSync(main)) return main;
      throw failure(
        'ModuleNotFound',
        `no entry module in ${dir}: looked for package.json "main", index.js and main.js`,
      );
    }
  }
  try {
    return req.resolve(path.resolve(dir, name));
  } catch (e) {
    throw failure('ModuleNotFound', `no module ${JSON.stringify(name)} in ${dir} (${e.message.split('\n')[0]})`);
  }
}

function findHandler(spec) {
  const dir = spec.code_dir;
  const file = entryFile(dir, spec.handler.module);
  process.chdir(dir);
  let exports;
  let globalMain;
  if (/\.c?js$/.test(file)) {
    const [mod, found] = compileEntry(file);
    exports = mod.exports;
    globalMain = found;
  } else {
    exports = require(file);
  }
  const where = `${path.relative(dir, file) || file}`;
  const wanted = spec.handler.function;
  if (wanted === '') {
    if (typeof exports === 'function') return { fn: exports, self: undefined };
    for (const name of ['main', 'handler']) {
      if (exports && typeof exports[name] === 'function') return { fn: exports[name], self: exports };
    }
    if (globalMain !== undefined) return { fn: globalMain, self: undefined };
    throw failure(
      'HandlerNotFound',
      `${where} is not a function and exports no function main or handler, nor declares a function main`,
    );
  }
  let self;
  let value = exports;
  const parts = wanted.split('.');
  for (const [i, part] of parts.entries()) {
    if (i === 0 && part === 'main' && parts.length === 1 && (value == null || value.main === undefined)) {
      value = globalMain;
      break;
    }
    self = value;
    value = value == null ? undefined : value[part];
  }
  if (typeof value !== 'function') {
    const what = value === undefined ? 'nothing' : `a ${typeof value}`;
    throw failure('HandlerNotFound', `${where} has no function ${wanted} (found ${what})`);
  }
  return { fn: value, self };
}

// Node's resolver read /etc/resolv.conf when node booted, in a stem cell with no
// network; an egress sandbox has the host's bind-mounted since: read it again.
function useResolvConf() {
  let text;
  try {
    text = fs.readFileSync('/etc/resolv.conf', 'utf8');
  } catch (_) {
    return;
  }
  const servers = [];
  for (const line of text.split('\n')) {
    const m = /^\s*nameserver\s+(\S+)/.exec(line);
    if (m) servers.push(m[1]);
  }
  if (servers.length > 0) {
    try {
      require('dns').setServers(servers);
    } catch (_) {
      // an address Node does not take: keep its default
    }
  }
}

// The function's packages (`load`'s deps, each `/deps/<key>/node_modules`, mounted
// read-only) are searched as Node searches NODE_PATH: after every node_modules
// directory up from the requiring file, so a module the function bundles in its own
// node_modules wins, and before Node's global folders. `sprout` and `@m6s/box` stay
// sprout's whatever the packages hold (OWN, above). The spare booted before its
// function was known: the module paths are made again now (Node's own `_initPaths`,
// what it runs at boot; child `node` processes inherit NODE_PATH).
function usePackages(deps) {
  if (deps === undefined) return;
  const ok = (d) => typeof d === 'string' && d.startsWith('/deps/') && !d.includes(path.delimiter) && path.isAbsolute(d);
  if (!Array.isArray(deps) || !deps.every(ok)) {
    throw failure('LoadError', `deps ${JSON.stringify(deps)} is not a list of /deps/ directories`);
  }
  if (deps.length === 0) return;
  process.env.NODE_PATH = deps.join(path.delimiter);
  Module._initPaths();
}

link.on('load', (spec) => {
  useResolvConf();
  // The function's environment (its ol.yaml's), there before its module is loaded.
  for (const [key, value] of Object.entries(spec.env || {})) {
    if (typeof value === 'string') process.env[key] = value;
  }
  try {
    usePackages(spec.deps);
    const found = findHandler(spec);
    handler = { ...found, spec };
  } catch (e) {
    link.send({ op: 'load_failed', error: describe(e) });
    return;
  }
  link.send({ op: 'loaded' });
});

// The context an AWS Lambda-style handler `(event, context)` gets.
function lambdaContext(spec, header) {
  return {
    functionName: spec.function,
    functionVersion: String(spec.version),
    awsRequestId: header.activation_id,
    memoryLimitInMB: String(spec.memory_mb),
    namespace: spec.namespace,
    callbackWaitsForEmptyEventLoop: true,
    getRemainingTimeInMillis() {
      return running === null ? 0 : Math.max(0, Math.round(running.deadline - performance.now()));
    },
  };
}

function runHandler(event, header) {
  const { fn, self, spec } = handler;
  if (fn.length < 2) return fn.call(self, event);
  const context = lambdaContext(spec, header);
  if (fn.length < 3) return fn.call(self, event, context);
  // (event, context, callback): the callback settles it, or the returned promise does.
  return new Promise((resolve, reject) => {
    const done = (error, result) => (error ? reject(error) : resolve(result));
    const value = fn.call(self, event, context, done);
    if (value && typeof value.then === 'function') value.then(resolve, reject);
  });
}

// An OpenWhisk activation's variables, set in process.env while it runs; returns
// what puts back what was there (a warm instance serves sprout's own invokes too).
function useEnv(env) {
  const saved = [];
  for (const [key, value] of Object.entries(env)) {
    if (typeof value !== 'string') continue;
    saved.push([key, Object.prototype.hasOwnProperty.call(process.env, key) ? process.env[key] : undefined]);
    process.env[key] = value;
  }
  return () => {
    for (const [key, value] of saved) {
      if (value === undefined) delete process.env[key];
      else process.env[key] = value;
    }
  };
}

// A rejection's reason as OpenWhisk's Node.js runtime reports it (`{error: ...}`):
// an error's name, message and stack with its own fields; any other value as it is.
function serialiseReason(e) {
  if (e instanceof Error || (e && typeof e === 'object' && typeof e.message === 'string' && typeof e.stack === 'string')) {
    const out = {};
    for (const key of Object.keys(e)) out[key] = e[key];
    out.name = e.name;
    out.message = e.message;
    out.stack = e.stack;
    return out;
  }
  return e;
}

function answer(header, payload) {
  if (running !== null && running.restore) running.restore();
  running = null;
  try {
    link.send(header, payload);
  } catch (e) {
    // An answer the link refuses (over its limits) is the function's failure.
    link.send({
      op: 'raised',
      error: { type: 'RangeError', message: `the answer cannot be sent: ${e.message}`, traceback: '' },
    });
  }
}

// An invoke with `env` is an OpenWhisk activation, run by OpenWhisk's Node.js rules:
// its variables set while it runs, a null event is {}, a synchronous throw is raised
// (the agent reports it as OpenWhisk does), a rejection is the result
// `{error: <reason>}` (`{error: {}}` for none), and `undefined` is `{}`.
link.on('invoke', async (header, payload) => {
  const openwhisk = header.env !== undefined && header.env !== null && typeof header.env === 'object';
  running = { deadline: performance.now() + header.remaining_ms, error: null, restore: null };
  const current = running;
  if (openwhisk) current.restore = useEnv(header.env);
  let result;
  let pending;
  try {
    let event = header.raw ? payload : JSON.parse(payload.toString('utf8'));
    if (openwhisk && (event === null || event === undefined)) event = {};
    pending = runHandler(event, header);
  } catch (e) {
    if (running === current) answer({ op: 'raised', error: describe(e) });
    return;
  }
  try {
    result = await pending;
  } catch (e) {
    if (running !== current) return;
    if (!openwhisk) {
      answer({ op: 'raised', error: describe(e) });
      return;
    }
    result = { error: e ? serialiseReason(e) : {} };
  }
  if (running !== current) return; // answered already (an uncaught error)
  if (openwhisk && result === undefined) result = {};
  if (Buffer.isBuffer(result) || result instanceof Uint8Array) {
    const bytes = Buffer.from(result.buffer, result.byteOffset, result.byteLength);
    answer({ op: 'returned', raw: true }, bytes);
    return;
  }
  let text;
  try {
    text = JSON.stringify(result === undefined ? null : result);
    if (text === undefined) throw new TypeError(`a ${typeof result} is not JSON`);
  } catch (e) {
    const error = describe(e);
    error.message = `handler result is not JSON-serialisable: ${error.message}`;
    answer({ op: 'raised', error });
    return;
  }
  answer({ op: 'returned' }, Buffer.from(text));
});

// An error nobody caught (a callback, a promise nobody awaits): the running
// invocation fails with it; between invocations it is only logged.
function uncaught(e) {
  process._rawDebug(`Uncaught ${e && e.stack ? e.stack : String(e)}`);
  if (running !== null) answer({ op: 'raised', error: describe(e) });
}
process.on('uncaughtException', uncaught);
process.on('unhandledRejection', uncaught);

link.send({ op: 'ready' });
