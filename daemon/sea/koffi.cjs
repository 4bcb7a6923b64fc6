// Stands in for the "koffi" package inside the single binary (build.sh aliases it here).
module.exports = require("./extract.ts").loadKoffiNative();
