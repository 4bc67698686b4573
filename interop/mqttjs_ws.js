#!/usr/bin/env node
// MQTT.js (the npm package `mqtt`, v5) in Node against Herald over WebSocket: ws and wss
// (with `ca`), URL path /mqtt, MQTT.js's defaults otherwise (protocol level 4, subprotocol
// `mqtt`, keepalive 60, automatic reconnect). For each transport:
//   1. subscribe, publish QoS 1, receive it at QoS 1;
//   2. push to a device: the device is subscribed to push/<its id> at CONNECT; a backend
//      publishes QoS 1 to it;
//   3. persistent session: the device leaves (clean: false), three QoS 1 pushes are stored, it
//      reconnects with session present and gets them in order;
//   4. a 200 KB payload arrives intact;
//   5. no connection was dropped (MQTT.js would have reconnected silently).
// Also: MQTT 3.1 (protocolId MQIsdp, level 3), for which MQTT.js asks for the subprotocol
// `mqttv3.1`; and wss with no `ca` (the CA is not in Node's roots) or the wrong one fails.
//
// Run by interop/run.sh from interop/ (node_modules from `npm ci`, scripts/deps.sh), with
// HERALD_HOST, HERALD_WS_PORT, HERALD_WSS_PORT, HERALD_CAFILE, HERALD_OTHER_CAFILE.
'use strict'

const fs = require('node:fs')
const crypto = require('node:crypto')
const mqtt = require('mqtt')

const HOST = process.env.HERALD_HOST || '127.0.0.1'
const WAIT = Number(process.env.INTEROP_WAIT || 5) * 1000 // ms for anything that must arrive
const QUIET = Number(process.env.INTEROP_QUIET || 1) * 1000 // ms of silence that mean "nothing came"
const RUN = String(process.pid)
const failures = []

function check (ok, what) {
  console.log((ok ? 'ok   - ' : 'FAIL - ') + what)
  if (!ok) failures.push(what)
  return ok
}

function env (name) {
  const v = process.env[name]
  if (!v) throw new Error(`${name} is not set (run this through interop/run.sh)`)
  return v
}

function url (transport) {
  const port = env(transport === 'wss' ? 'HERALD_WSS_PORT' : 'HERALD_WS_PORT')
  return `${transport}://${HOST}:${port}/mqtt`
}

function timeout (promise, ms, what) {
  let timer
  return Promise.race([
    promise,
    new Promise((resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`no ${what} within ${ms} ms`)), ms)
    })
  ]).finally(() => clearTimeout(timer))
}

const show = (msgs) => JSON.stringify(msgs.map((m) => [m.topic, m.payload.length > 64 ? `<${m.payload.length} bytes>` : m.payload.toString(), m.qos, m.retain ? 1 : 0, m.dup ? 1 : 0]))

// One MQTT.js client and what it received.
class Peer {
  constructor (transport, clientId, opts = {}) {
    this.clientId = clientId
    this.messages = []
    this.waiters = []
    this.reconnects = 0
    this.errors = []
    const tls = transport === 'wss' ? { ca: fs.readFileSync(env('HERALD_CAFILE')) } : {}
    this.client = mqtt.connect(url(transport), { protocolVersion: 4, clientId, ...tls, ...opts })
    this.client.on('message', (topic, payload, packet) => {
      this.messages.push({ topic, payload, qos: packet.qos, retain: packet.retain, dup: packet.dup })
      for (const w of this.waiters.splice(0)) w()
    })
    this.client.on('reconnect', () => { this.reconnects++ })
    this.client.on('error', (e) => { this.errors.push(e.message) })
  }

  // Resolves with the CONNACK (sessionPresent, returnCode); rejects on an error or timeout.
  connected () {
    return timeout(new Promise((resolve, reject) => {
      this.client.once('connect', (connack) => resolve(connack))
      this.client.once('error', reject)
    }), WAIT, `CONNACK for ${this.clientId}`)
  }

  // Up to n messages within ms.
  async recv (n, ms = WAIT) {
    const deadline = Date.now() + ms
    while (this.messages.length < n && Date.now() < deadline) {
      await new Promise((resolve) => {
        const t = setTimeout(resolve, deadline - Date.now())
        this.waiters.push(() => { clearTimeout(t); resolve() })
      })
    }
    return this.messages.splice(0, n)
  }

  async quiet (ms = QUIET) {
    await new Promise((resolve) => setTimeout(resolve, ms))
    return this.messages.splice(0)
  }

  publish (topic, payload, qos = 1) {
    return timeout(this.client.publishAsync(topic, payload, { qos }), WAIT, `PUBACK for ${topic}`)
  }

  subscribe (topic, qos = 1) {
    return timeout(this.client.subscribeAsync(topic, { qos }), WAIT, `SUBACK for ${topic}`)
  }

  end () {
    return timeout(this.client.endAsync(), WAIT, `end of ${this.clientId}`).catch(() => this.client.end(true))
  }
}

async function run (transport) {
  const tag = `${transport}-js-${RUN}`
  const devId = `dev-${tag}`
  const push = `push/${devId}`
  const topic = `interop/${tag}/t`
  const peers = []
  const peer = (...a) => { const p = new Peer(transport, ...a); peers.push(p); return p }
  try {
    // 1. subscribe, publish QoS 1, receive
    const backend = peer(`backend-${tag}`)
    const ack = await backend.connected()
    check(ack.returnCode === 0 && !ack.sessionPresent, `${transport}: connect with MQTT.js defaults, CONNACK ${ack.returnCode}`)
    const granted = await backend.subscribe(topic, 1)
    check(granted.length === 1 && granted[0].qos === 1, `${transport}: SUBSCRIBE ${topic} granted QoS 1: ${JSON.stringify(granted)}`)
    await backend.publish(topic, 'ping', 1)
    let got = await backend.recv(1)
    check(show(got) === show([{ topic, payload: Buffer.from('ping'), qos: 1 }]), `${transport}: QoS 1 publish comes back at QoS 1: ${show(got)}`)

    // 2. push to a device that sent no SUBSCRIBE
    let dev = peer(devId, { clean: false })
    let devAck = await dev.connected()
    check(devAck.returnCode === 0, `${transport}: device connects with clean: false, CONNACK ${devAck.returnCode}`)
    await backend.publish(push, 'hello', 1)
    got = await dev.recv(1)
    check(show(got) === show([{ topic: push, payload: Buffer.from('hello'), qos: 1 }]), `${transport}: device gets its push at QoS 1: ${show(got)}`)

    // 4. a large payload, as a push and on an ordinary topic
    const big = crypto.randomBytes(200 * 1024)
    await backend.publish(push, big, 1)
    got = await dev.recv(1, 15000)
    check(got.length === 1 && got[0].payload.equals(big), `${transport}: 200 KB push arrives intact: ${show(got)}`)
    const big2 = crypto.randomBytes(200 * 1024)
    await dev.publish(topic, big2, 1)
    got = await backend.recv(1, 15000)
    check(got.length === 1 && got[0].payload.equals(big2), `${transport}: 200 KB QoS 1 publish arrives intact: ${show(got)}`)

    // 3. persistent session
    await dev.end()
    for (const i of [1, 2, 3]) await backend.publish(push, `offline-${i}`, 1)
    const devReconnects = dev.reconnects
    dev = peer(devId, { clean: false })
    devAck = await dev.connected()
    check(devAck.returnCode === 0 && devAck.sessionPresent, `${transport}: reconnect with clean: false: session present (${devAck.sessionPresent}, CONNACK ${devAck.returnCode})`)
    got = await dev.recv(3)
    check(show(got) === show([1, 2, 3].map((i) => ({ topic: push, payload: Buffer.from(`offline-${i}`), qos: 1 }))),
      `${transport}: offline pushes replayed in order: ${show(got)}`)
    got = await dev.quiet()
    check(got.length === 0, `${transport}: nothing delivered twice: ${show(got)}`)

    // 5. nobody was disconnected behind our back
    const drops = devReconnects + dev.reconnects + backend.reconnects
    check(drops === 0, `${transport}: no connection was dropped and reconnected (${drops} reconnects; errors: ${JSON.stringify(peers.flatMap((p) => p.errors))})`)

    // Leave no session behind.
    await dev.end()
    const gone = peer(devId, { clean: true })
    await gone.connected()
  } catch (e) {
    check(false, `${transport}: ${e.message}`)
  } finally {
    await Promise.all(peers.map((p) => p.end()))
  }
}

// MQTT 3.1: MQTT.js sends protocol name MQIsdp, level 3, and asks for subprotocol mqttv3.1.
async function mqtt31 () {
  const tag = `v31-js-${RUN}`
  const p = new Peer('ws', tag, { protocolId: 'MQIsdp', protocolVersion: 3 })
  try {
    const ack = await p.connected()
    check(ack.returnCode === 0, `ws: MQTT 3.1 (MQIsdp, subprotocol mqttv3.1) connects, CONNACK ${ack.returnCode}`)
    await p.subscribe(`interop/${tag}`, 1)
    await p.publish(`interop/${tag}`, 'v31', 1)
    const got = await p.recv(1)
    check(got.length === 1 && got[0].payload.toString() === 'v31' && got[0].qos === 1, `ws: MQTT 3.1 QoS 1 round trip: ${show(got)}`)
  } catch (e) {
    check(false, `ws: MQTT 3.1: ${e.message}`)
  } finally {
    await p.end()
  }
}

// wss that does not trust Herald's CA: the connection fails, with no reconnect.
async function untrusted (what, tlsOpts) {
  const client = mqtt.connect(url('wss'), { protocolVersion: 4, clientId: `untrusted-js-${RUN}`, reconnectPeriod: 0, ...tlsOpts })
  try {
    const outcome = await timeout(new Promise((resolve) => {
      client.once('connect', () => resolve('connected'))
      client.once('error', (e) => resolve(`error: ${e.code || ''} ${e.message}`))
      client.once('close', () => resolve('closed'))
    }), WAIT, `outcome of ${what}`)
    check(outcome !== 'connected', `wss ${what}: fails to connect (${outcome})`)
  } catch (e) {
    check(false, `wss ${what}: ${e.message}`)
  } finally {
    client.end(true)
  }
}

async function main () {
  await run('ws')
  await run('wss')
  await mqtt31()
  await untrusted('without ca', {})
  await untrusted('with a CA that did not sign the server certificate', { ca: fs.readFileSync(env('HERALD_OTHER_CAFILE')) })
  if (failures.length) {
    console.log(`${failures.length} check(s) failed`)
    process.exit(1)
  }
  console.log('all checks passed')
  process.exit(0)
}

main().catch((e) => {
  console.log(`FAIL - ${e.stack || e}`)
  process.exit(1)
})
