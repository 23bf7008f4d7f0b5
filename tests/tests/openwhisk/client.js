// Drives a sprout node with OpenWhisk's official JavaScript client (the `openwhisk`
// npm package, installed by .ci/setup). Usage:
//   node client.js MODE   (MODE: actions | invokes), with SPROUT_URL, SPROUT_KEY,
//   SPROUT_WRONG_KEY and SPROUT_ZIP_NODE, SPROUT_ZIP_PY (base64 zips) in the environment.
// Prints one JSON line per step ({"step": ..., "value": ...}); exits 1 on a failure.
'use strict'
const openwhisk = require('openwhisk')

const ow = openwhisk({ apihost: process.env.SPROUT_URL, api_key: process.env.SPROUT_KEY })
const say = (step, value) => console.log(JSON.stringify({ step, value }))
const fail = (why) => { console.error(why); process.exit(1) }
const check = (cond, why) => { if (!cond) fail(why) }

const PY = 'def main(args):\n    print("hello stdout")\n    return {"greeting": "hello " + args.get("name", "?"), "dflt": args.get("dflt")}\n'
const JS = 'function main(params) { console.log("hello stdout"); return { greeting: "hello " + params.name, dflt: params.dflt } }'

const actions = [
  { name: 'pyinline', kind: 'python:3', action: PY },
  { name: 'jsinline', kind: 'nodejs:20', action: JS },
  { name: 'pkg/jszip', kind: 'nodejs:default', action: Buffer.from(process.env.SPROUT_ZIP_NODE, 'base64') },
  { name: 'pyzip', kind: 'python:default', action: Buffer.from(process.env.SPROUT_ZIP_PY, 'base64') }
]

async function createAll () {
  for (const a of actions) {
    const created = await ow.actions.create({ name: a.name, kind: a.kind, action: a.action, params: { dflt: 'd' } })
    check(created.exec.kind === a.kind, `create ${a.name}: ${JSON.stringify(created)}`)
    say('created', created.name)
  }
  const got = await ow.actions.get({ name: 'pyinline' })
  check(got.exec.code === PY && got.parameters[0].key === 'dflt', `get: ${JSON.stringify(got)}`)
  say('got', { name: got.name, version: got.version })
  const list = await ow.actions.list()
  say('listed', list.map(a => a.name).sort())
  // Without overwrite, an existing action is a conflict.
  try {
    await ow.actions.create({ name: 'pyinline', kind: 'python:3', action: PY })
    fail('a second create succeeded')
  } catch (e) { say('conflict', e.statusCode) }
  const wrong = openwhisk({ apihost: process.env.SPROUT_URL, api_key: process.env.SPROUT_WRONG_KEY })
  try {
    await wrong.actions.list()
    fail('a wrong key listed actions')
  } catch (e) { say('wrong key', e.statusCode) }
}

async function invokes () {
  for (const a of actions) {
    const blocking = await ow.actions.invoke({ name: a.name, params: { name: 'ow' }, blocking: true })
    check(blocking.response.success, `invoke ${a.name}: ${JSON.stringify(blocking)}`)
    say('blocking', { name: a.name, result: blocking.response.result, logs: blocking.logs.length > 0 })
    const result = await ow.actions.invoke({ name: a.name, params: { name: 'r' }, blocking: true, result: true })
    say('result', { name: a.name, result })
    const accepted = await ow.actions.invoke({ name: a.name, params: { name: 'nb' } })
    check(/^[0-9a-f]{32}$/.test(accepted.activationId), `non-blocking: ${JSON.stringify(accepted)}`)
    let record = null
    for (let i = 0; i < 200 && record === null; i++) {
      try { record = await ow.activations.get({ name: accepted.activationId }) } catch (e) {
        await new Promise(resolve => setTimeout(resolve, 100))
      }
    }
    check(record !== null, `activation ${accepted.activationId} never finished`)
    const res = await ow.activations.result({ name: accepted.activationId })
    const logs = await ow.activations.logs({ name: accepted.activationId })
    say('activation', { name: a.name, result: res.result, success: res.success, logs: logs.logs.length > 0 })
  }
  const list = await ow.activations.list({ limit: 50 })
  say('activations', list.length)
  for (const a of actions) {
    await ow.actions.delete({ name: a.name })
    say('deleted', a.name)
  }
}

const mode = process.argv[2]
const run = mode === 'actions' ? createAll : mode === 'invokes' ? async () => { await createAll(); await invokes() } : null
if (!run) fail(`unknown mode ${mode}`)
run().catch(e => fail(`${e.message} ${JSON.stringify(e.error || {})}`))
