// Where the build puts what the host reads at run time: the transpiled
// component and the shared schema files (copied from host/schema).

/** hosts/node/dist/ */
export const DIST_DIR = new URL('../dist/', import.meta.url);
/** The copies of host/schema/sqlite/*.sql and host/schema/catalogue.json. */
export const SCHEMA_DIR = new URL('schema/', DIST_DIR);
