module.exports = async () => {
    console.log("pong")

    return "ponged"
}
