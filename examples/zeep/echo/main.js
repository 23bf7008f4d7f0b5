module.exports = async (arg) => arg
