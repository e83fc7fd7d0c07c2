// The official Scaleway TypeScript SDK, unmodified, against `snapfs serve`: Instance
// and Block Storage v1. Run by tests/test_ts_sdk.py (`node --test`), which starts the
// server and passes it in the environment:
//   SNAPFS_URL, SNAPFS_SECRET, SNAPFS_ACCESS, SNAPFS_ORG, SNAPFS_PROJECT,
//   SNAPFS_VOLUME (a block volume), SNAPFS_LSSD (a local SSD volume), SNAPFS_BUCKET.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { test } from 'node:test'
import { Blockv1 } from '@scaleway/sdk-block'
import { createClient } from '@scaleway/sdk-client'
import { Instancev1 } from '@scaleway/sdk-instance'

const env = process.env
const profile = {
  accessKey: env.SNAPFS_ACCESS,
  secretKey: env.SNAPFS_SECRET,
  apiURL: env.SNAPFS_URL,
  defaultOrganizationId: env.SNAPFS_ORG,
  defaultProjectId: env.SNAPFS_PROJECT,
  defaultZone: 'fr-par-1',
}
const client = createClient(profile)
const block = new Blockv1.API(client)
const instance = new Instancev1.API(client)
const fast = { minDelay: 1, maxDelay: 1, timeout: 60 }
const tag = () => `t${randomUUID().slice(0, 12)}`

async function refused(promise) {
  try {
    await promise
  } catch (err) {
    return err
  }
  assert.fail('expected a refusal')
}

async function instanceAvailable(id) {
  for (let i = 0; i < 600; i += 1) {
    const { snapshot } = await instance.getSnapshot({ snapshotId: id })
    if (snapshot.state === 'available') return snapshot
    await new Promise(resolve => setTimeout(resolve, 50))
  }
  assert.fail(`instance snapshot ${id} never available`)
}

test('block: create, wait, get, update, list with paging and filters, delete', async () => {
  const t = tag()
  const ids = []
  for (let i = 0; i < 3; i += 1) {
    const s = await block.createSnapshot({ volumeId: env.SNAPFS_VOLUME, public: false,
                                           name: `ts-${i}`, tags: [t] })
    assert.equal(s.parentVolume.id, env.SNAPFS_VOLUME)
    assert.ok(['creating', 'available'].includes(s.status))
    ids.push(s.id)
  }
  const done = await block.waitForSnapshot({ snapshotId: ids[0] }, fast)
  assert.equal(done.status, 'available')
  assert.ok(done.createdAt instanceof Date)
  for (const id of ids) await block.waitForSnapshot({ snapshotId: id }, fast)

  const page = await block.listSnapshots({ tags: [t], pageSize: 2, page: 1 })
  assert.equal(Number(page.totalCount), 3)
  assert.deepEqual(page.snapshots.map(s => s.id), ids.slice(0, 2))
  const all = await block.listSnapshots({ tags: [t], pageSize: 2 }).all()
  assert.deepEqual(all.map(s => s.id), ids)
  const byName = await block.listSnapshots({ tags: [t], name: 'ts-1' }).all()
  assert.deepEqual(byName.map(s => s.id), [ids[1]])
  const desc = await block.listSnapshots({ tags: [t], orderBy: 'name_desc' }).all()
  assert.deepEqual(desc.map(s => s.name), ['ts-2', 'ts-1', 'ts-0'])

  const upd = await block.updateSnapshot({ snapshotId: ids[0], name: 'ts-renamed',
                                           tags: [t, 'x'] })
  assert.equal(upd.name, 'ts-renamed')
  assert.deepEqual((await block.getSnapshot({ snapshotId: ids[0] })).tags, [t, 'x'])

  const vol = await block.getVolume({ volumeId: env.SNAPFS_VOLUME })
  assert.equal(vol.id, env.SNAPFS_VOLUME)
  const vols = await block.listVolumes({}).all()
  assert.ok(vols.some(v => v.id === env.SNAPFS_VOLUME))
  assert.ok(!vols.some(v => v.id === env.SNAPFS_LSSD))

  for (const id of ids) await block.deleteSnapshot({ snapshotId: id })
  const gone = await refused(block.getSnapshot({ snapshotId: ids[0] }))
  assert.equal(gone.status, 404)
})

test('block: volume create, update, delete (and what this server refuses)', async () => {
  const GiB = 1024 ** 3
  const vol = await block.createVolume({ name: 'ts-made', fromEmpty: { size: GiB },
                                         tags: ['a'] })
  assert.equal(vol.type, 'sbs_5k')
  assert.equal(Number(vol.size), GiB)
  assert.deepEqual(vol.tags, ['a'])
  const upd = await block.updateVolume({ volumeId: vol.id, name: 'ts-renamed',
                                         tags: ['b'] })
  assert.equal(upd.name, 'ts-renamed')
  assert.deepEqual((await block.getVolume({ volumeId: vol.id })).tags, ['b'])
  const resize = await refused(block.updateVolume({ volumeId: vol.id, size: 2 * GiB }))
  assert.equal(resize.status, 400)
  const restore = await refused(block.createVolume({ name: 'ts-restored',
    fromSnapshot: { snapshotId: randomUUID() } }))
  assert.equal(restore.status, 400)
  assert.equal(Number((await block.getVolume({ volumeId: vol.id })).size), GiB)
  await block.deleteVolume({ volumeId: vol.id })
  const gone = await refused(block.getVolume({ volumeId: vol.id }))
  assert.equal(gone.status, 404)
  const vols = await block.listVolumes({}).all()
  assert.ok(!vols.some(v => v.name === 'ts-restored' || v.id === vol.id))
})

test('block: export to and import from Object Storage', async () => {
  const s = await block.createSnapshot({ volumeId: env.SNAPFS_VOLUME, public: false,
                                         name: 'ts-exp' })
  await block.waitForSnapshot({ snapshotId: s.id }, fast)
  const exp = await block.exportSnapshotToObjectStorage({ snapshotId: s.id,
                                                         bucket: env.SNAPFS_BUCKET,
                                                         key: 'ts.qcow2' })
  assert.equal(exp.id, s.id)
  assert.ok(['exporting', 'available'].includes(exp.status))
  assert.equal((await block.waitForSnapshot({ snapshotId: s.id }, fast)).status, 'available')
  const imp = await block.importSnapshotFromObjectStorage({ bucket: env.SNAPFS_BUCKET,
                                                           key: 'ts.qcow2', name: 'ts-imp' })
  assert.equal(imp.status, 'creating')
  const back = await block.waitForSnapshot({ snapshotId: imp.id }, fast)
  assert.equal(back.status, 'available')
  assert.equal(back.size, s.size)
  await block.deleteSnapshot({ snapshotId: imp.id })
  await block.deleteSnapshot({ snapshotId: s.id })
})

test('block: errors (404, 401/403, 400) change nothing', async () => {
  const missing = randomUUID()
  const nf = await refused(block.getSnapshot({ snapshotId: missing }))
  assert.equal(nf.status, 404)
  const lssd = await refused(block.getVolume({ volumeId: env.SNAPFS_LSSD }))
  assert.equal(lssd.status, 404)
  const before = Number((await block.listSnapshots({ pageSize: 100 })).totalCount)
  const bad = await refused(block.createSnapshot({ volumeId: env.SNAPFS_VOLUME,
                                                  public: false, name: 'a/b' }))
  assert.equal(bad.status, 400)
  const page = await refused(block.listSnapshots({ pageSize: 101 }))
  assert.equal(page.status, 400)
  assert.equal(Number((await block.listSnapshots({ pageSize: 100 })).totalCount), before)
  const stranger = new Blockv1.API(createClient({ ...profile, secretKey: randomUUID() }))
  const denied = await refused(stranger.listSnapshots({}))
  assert.equal(denied.status, 401)
  assert.equal(denied.name, 'DeniedAuthenticationError')
  assert.match(denied.message, /api_key does not exist/)
  const res = await fetch(`${env.SNAPFS_URL}/block/v1/zones/fr-par-1/snapshots`)
  assert.equal(res.status, 401)
})

test('instance: create, get, get-then-set round trip, update, export, delete', async () => {
  const t = tag()
  const { snapshot } = await instance.createSnapshot({ volumeId: env.SNAPFS_LSSD,
                                                      name: 'ts-inst', tags: [t] })
  const got = await instanceAvailable(snapshot.id)
  assert.ok(got.creationDate instanceof Date)
  // Get-then-set: the SDK sends its Dates back as ...sssZ (milliseconds).
  const set = await instance._setSnapshot({ ...got, snapshotId: got.id, name: 'ts-set',
                                            tags: [t, 'y'] })
  assert.equal(set.snapshot.name, 'ts-set')
  assert.deepEqual(set.snapshot.tags, [t, 'y'])
  // A changed read-only field is still refused, and nothing changes.
  const bad = await refused(instance._setSnapshot({ ...got, snapshotId: got.id,
                                                    size: got.size + 512 }))
  assert.equal(bad.status, 400)
  assert.equal((await instance.getSnapshot({ snapshotId: got.id })).snapshot.name, 'ts-set')
  const upd = await instance.updateSnapshot({ snapshotId: got.id, name: 'ts-upd' })
  assert.equal(upd.snapshot.name, 'ts-upd')
  const page = await instance.listSnapshots({ tags: t, perPage: 1 })
  assert.equal(Number(page.totalCount), 1)
  const { task } = await instance.exportSnapshot({ snapshotId: got.id,
                                                   bucket: env.SNAPFS_BUCKET,
                                                   key: 'inst.qcow2' })
  assert.ok(task.id)
  await instanceAvailable(got.id)
  const { snapshot: imp } = await instance.createSnapshot({ name: 'ts-inst-imp',
                                                           bucket: env.SNAPFS_BUCKET,
                                                           key: 'inst.qcow2',
                                                           volumeType: 'l_ssd' })
  assert.equal((await instanceAvailable(imp.id)).size, got.size)
  await instance.deleteSnapshot({ snapshotId: imp.id })
  await instance.deleteSnapshot({ snapshotId: got.id })
  const gone = await refused(instance.getSnapshot({ snapshotId: got.id }))
  assert.equal(gone.status, 404)
})
