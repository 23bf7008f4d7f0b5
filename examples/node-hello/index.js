// An OpenWhisk-style Node.js action: main(params) returns a JSON object.
function main(params) {
  const name = params && params.name ? params.name : 'world';
  console.log(`greeting ${name}`);
  return { greeting: `Hello, ${name}!` };
}

exports.main = main;
