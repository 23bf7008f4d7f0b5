// A CouchDB-compatible server for the invoker tests: express-pouchdb over PouchDB's
// in-memory adapter (pure JavaScript, nothing on disk), on 127.0.0.1 and a free
// port, which it prints as its first line of output ("listening PORT"). It runs until
// its stdin closes (the test that started it dies or drops it).
//
// The modules come from SPROUT_POUCHDB (default /opt/sprout-ci/pouchdb, installed
// pinned by .ci/setup).
'use strict';
const root = (process.env.SPROUT_POUCHDB || '/opt/sprout-ci/pouchdb') + '/node_modules/';
const load = (name) => require(root + name);

const PouchDB = load('pouchdb-core')
  .plugin(load('pouchdb-adapter-memory'))
  .plugin(load('pouchdb-adapter-http'))
  .plugin(load('pouchdb-mapreduce'))
  .plugin(load('pouchdb-replication'));
const InMemory = PouchDB.defaults({ adapter: 'memory' });

const app = load('express')();
app.use('/', load('express-pouchdb')(InMemory, {
  mode: 'minimumForPouchDB',
  inMemoryConfig: true,
  logPath: '/dev/null',
}));
const server = app.listen(0, '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
